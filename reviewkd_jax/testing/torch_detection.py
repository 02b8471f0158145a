"""torchvision's Faster/Mask R-CNN, runnable on CPU-only PyTorch: the detection parity reference.

torchvision's wheels are CUDA builds whose compiled `nms` kernel is absent on a CPU-only torch.
`detection_models()` registers a Python `nms` (greedy, in descending score order, suppressing
IoU > threshold, exactly the rule of torchvision's kernel) for the `torchvision::nms` op and
makes `torchvision.ops.boxes._assert_has_ops` a no-op; `roi_align` falls back to its
pure-PyTorch implementation by itself. Nothing here is imported by the training library.
"""
from __future__ import annotations

import functools

import torch

from reviewkd_jax.testing import _KEEP_ALIVE, torchvision


def python_nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
  """Returns the kept indices, sorted by descending score: torchvision's greedy NMS rule."""
  if dets.numel() == 0:
    return torch.empty((0,), dtype=torch.int64)
  order = torch.argsort(scores, descending=True, stable=True)
  d = dets[order].double()
  lt = torch.maximum(d[:, None, :2], d[None, :, :2])
  rb = torch.minimum(d[:, None, 2:], d[None, :, 2:])
  inter = (rb - lt).clamp(min=0).prod(-1)
  areas = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])
  over = (inter / (areas[:, None] + areas[None, :] - inter) > iou_threshold).numpy()
  suppressed = [False] * len(order)
  keep = []
  for i in range(len(order)):
    if suppressed[i]:
      continue
    keep.append(i)
    for j in over[i].nonzero()[0]:
      if j > i:
        suppressed[j] = True
  return order[torch.tensor(keep, dtype=torch.int64)]


@functools.cache
def detection_models():
  """Returns `torchvision.models.detection` with a working CPU `nms`."""
  tv = torchvision()
  lib = torch.library.Library('torchvision', 'IMPL')
  lib.impl('nms', python_nms, 'CPU')
  _KEEP_ALIVE.append(lib)
  import torchvision.ops.boxes as tv_boxes  # pylint: disable=g-import-not-at-top
  tv_boxes._assert_has_ops = lambda: None  # pylint: disable=protected-access
  return tv.models.detection


def build(kind: str = 'faster', *, num_classes: int = 91, min_size: int = 128,
          max_size: int = 160, seed: int = 0, **kwargs):
  """Returns torchvision's `fasterrcnn_resnet50_fpn` or `maskrcnn_resnet50_fpn`, random weights.

  `kind` is 'faster' or 'mask'. No download: weights=None, weights_backbone=None; the
  backbone's BatchNorms are torchvision's FrozenBatchNorm2d (filled with non-trivial random
  statistics here so that the parity tests exercise them). Returned in eval mode.
  """
  det = detection_models()
  torch.manual_seed(seed)
  fn = {'faster': det.fasterrcnn_resnet50_fpn, 'mask': det.maskrcnn_resnet50_fpn}[kind]
  model = fn(weights=None, weights_backbone=None, num_classes=num_classes,
             min_size=min_size, max_size=max_size, **kwargs)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith('running_var'):
        buf.copy_(torch.rand(buf.shape, generator=gen) * 0.5 + 0.75)
      elif name.endswith('running_mean'):
        buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
      elif name.endswith('.weight') and buf.ndim == 1:   # FrozenBatchNorm2d keeps w/b as buffers
        buf.copy_(torch.rand(buf.shape, generator=gen) * 0.5 + 0.75)
      elif name.endswith('.bias') and buf.ndim == 1:
        buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
  return model.eval()
