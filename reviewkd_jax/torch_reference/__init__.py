"""PyTorch reference implementations (needs `torch`; torchvision for the ImageNet ResNets).

Written from the published architectures with the CRD benchmark's, torchvision's and the
ReviewKD authors' layer names, so their state_dicts are the ones users hold. Used by the parity
tests and by the PyTorch rows of `reviewkd_jax.benchmark`. `build(name)` returns
`(model, forward)` where `forward(model, x_nchw)` gives `(logits, features)` in our layout.
"""
from __future__ import annotations

import functools

try:
  import torch
except ImportError as e:  # pragma: no cover
  raise ImportError('reviewkd_jax.torch_reference needs PyTorch: pip install torch') from e

_KEEP_ALIVE = []


@functools.cache
def torchvision():
  """Returns the torchvision module, importable on CPU torch (its CUDA-only ops declared)."""
  try:
    lib = torch.library.Library('torchvision', 'DEF')
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')
    _KEEP_ALIVE.append(lib)
  except RuntimeError:
    pass  # declared already (or a torchvision with its own CPU ops)
  import torchvision as tv  # pylint: disable=g-import-not-at-top
  return tv


def build(name: str, num_classes: int = 100):
  """Returns (PyTorch model, forward fn) for any registered model name."""
  from reviewkd_jax.torch_reference import cifar_a, cifar_b, imagenet
  if name in cifar_a.BUILDERS:
    return cifar_a.build(name, num_classes), cifar_a.forward
  if name in cifar_b.REFERENCES:
    return cifar_b.REFERENCES[name](num_classes=num_classes), lambda model, x: model(x)
  if name == 'mobilenet_v1':
    return imagenet.AuthorsMobileNet(num_classes=num_classes), imagenet.mobilenet_forward
  if name in ('resnet18', 'resnet34', 'resnet50', 'resnet101'):
    return getattr(torchvision().models, name)(num_classes=num_classes), imagenet.resnet_forward
  raise ValueError(f'no PyTorch reference for {name!r}')
