"""torchvision's Faster/Mask R-CNN, runnable on CPU-only PyTorch: the detection parity reference.

torchvision's wheels are CUDA builds whose compiled `nms` kernel is absent on a CPU-only torch.
`detection_models()` registers a Python `nms` (greedy, in descending score order, suppressing
IoU > threshold, exactly the rule of torchvision's kernel) for the `torchvision::nms` op and
makes `torchvision.ops.boxes._assert_has_ops` a no-op; `roi_align` falls back to its
pure-PyTorch implementation by itself.

One fix to that fallback: torchvision's compiled RoIAlign kernels (CPU and CUDA, the ones
Detectron2 and torchvision's detectors run) give a sample with y < -1 or y > height (likewise
x) the value 0; the pure-PyTorch `_bilinear_interpolate` of torchvision 0.28 omits that test
and clamps such samples to the border pixel instead. Only RoIs reaching past the feature map
(boxes at the right/bottom image border with `aligned=False`, whose width is raised to one
feature pixel) see the difference. `detection_models()` wraps the fallback with the kernel's
rule, so the reference computes what the compiled kernel computes. Nothing here is imported by
the training library.
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
  import importlib  # pylint: disable=g-import-not-at-top
  # The module, not the function `torchvision.ops.roi_align` that shadows its name.
  tv_roi_align = importlib.import_module('torchvision.ops.roi_align')
  tv_boxes._assert_has_ops = lambda: None  # pylint: disable=protected-access
  tv_roi_align._bilinear_interpolate = _kernel_rule(tv_roi_align._bilinear_interpolate)  # pylint: disable=protected-access
  return tv.models.detection


def _kernel_rule(bilinear_interpolate):
  """Returns the fallback's `_bilinear_interpolate` with the compiled kernel's zero rule."""

  def wrapped(input, roi_batch_ind, y, x, ymask, xmask):  # pylint: disable=redefined-builtin
    height, width = input.shape[-2:]
    val = bilinear_interpolate(input, roi_batch_ind, y, x, ymask, xmask)  # [K,C,PH,PW,IY,IX]
    inside_y = ((y >= -1.0) & (y <= height))[:, None, :, None, :, None]   # y: [K, PH, IY]
    inside_x = ((x >= -1.0) & (x <= width))[:, None, None, :, None, :]    # x: [K, PW, IX]
    return val * (inside_y & inside_x).to(val.dtype)

  return wrapped


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
