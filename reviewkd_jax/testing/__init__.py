"""PyTorch references for the parity tests and the benchmark's PyTorch rows; never imported
by the training library itself (needs `torch`; torchvision for the ImageNet ResNets).

Written from the published architectures with the CRD benchmark's, torchvision's and the
ReviewKD authors' layer names, so their state_dicts are the ones users hold:

- `torch_cifar_resnet_wrn_vgg`: CRD's CIFAR ResNets (incl. ResNet50), WRNs and VGGs;
- `torch_cifar_shufflenet_mobilenetv2`: CRD's ShuffleNetV1/V2 and MobileNetV2;
- `torch_imagenet`: feature extraction around torchvision's ResNets, the authors' MobileNet,
  and both networks run the way the authors' ImageNet ReviewKD code runs them;
- `torch_reviewkd`: the authors' ABF, ReviewKD student wrapper and `hcl`.

`build(name)` returns `(model, forward)` where `forward(model, x_nchw)` gives
`(logits, features)` in our layout.
"""
from __future__ import annotations

import functools

try:
  import torch
except ImportError as e:  # pragma: no cover
  raise ImportError('reviewkd_jax.testing needs PyTorch: pip install torch') from e

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
  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.testing import torch_cifar_resnet_wrn_vgg as resnet_wrn_vgg
  from reviewkd_jax.testing import torch_cifar_shufflenet_mobilenetv2 as shufflenet_mobilenet
  from reviewkd_jax.testing import torch_imagenet as imagenet
  if name in resnet_wrn_vgg.BUILDERS:
    return resnet_wrn_vgg.build(name, num_classes), resnet_wrn_vgg.forward
  if name in shufflenet_mobilenet.REFERENCES:
    return (shufflenet_mobilenet.REFERENCES[name](num_classes=num_classes),
            lambda model, x: model(x))
  if name == 'mobilenet_v1':
    return imagenet.AuthorsMobileNet(num_classes=num_classes), imagenet.mobilenet_forward
  if name in ('resnet18', 'resnet34', 'resnet50', 'resnet101'):
    return getattr(torchvision().models, name)(num_classes=num_classes), imagenet.resnet_forward
  raise ValueError(f'no PyTorch reference for {name!r}')
