"""Two-stage detectors in Flax: Faster R-CNN and Mask R-CNN with FPN, as Detectron2 defines them.

Static shapes everywhere under `jit` (padded images and ground truth, fixed proposal counts,
fixed-size NMS); Detectron2's conventions by default, torchvision's as options (used by the
parity tests against torchvision). See docs/detection.md.
"""
