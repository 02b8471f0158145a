"""CIFAR ResNets of the CRD benchmark (RepDistiller `models/resnet.py`): resnet8 ... resnet32x4.

A 3x3 conv stem at full resolution, three stages of BasicBlocks (strides 1, 2, 2), global
average pooling and `fc`. The blocks and the skeleton also serve CRD's CIFAR ResNet50
(`cifar_resnet_v2`), which differs only in widths, block type and the names of its shortcut
(`shortcut` instead of `downsample`) and classifier (`linear` instead of `fc`). Module names
follow the converter's rule (`layer1.0.downsample.0` -> `layer1_0/downsample_0`).

Features (docs/reviewkd.md): `preact` is each stage's last residual sum before its ReLU, which is
what CRD's `is_last` blocks return as `preact`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model

# (kernel, carries the block's stride?, width multiplier of `planes`) per conv of the branch.
# CRD puts the stride on the first 3x3 conv (BasicBlock) and on the 3x3 conv (Bottleneck).
BASIC = ((3, True, 1), (3, False, 1))
BOTTLENECK = ((1, False, 1), (3, True, 1), (1, False, 4))


class ResidualBlock(nn.Module):
  """CRD's BasicBlock or Bottleneck, chosen by `branch` (convs `conv{i}`, BNs `bn{i}`)."""
  planes: int
  branch: Sequence[tuple[int, bool, int]]
  stride: int = 1
  shortcut_name: str = 'downsample'
  dtype: layers.Dtype = jnp.float32
  # `layers.block_output` on the residual sum (XLA:CPU fusion; values never change): set by
  # the CIFAR ResNets, where it was measured faster on CPU, not by the ImageNet ones.
  fusion_barrier: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns the residual sum before the block's ReLU (the caller applies it)."""
    out = x
    for i, (kernel, strided, mult) in enumerate(self.branch, start=1):
      if i > 1:
        out = nn.relu(out)
      out = layers.conv(self.planes * mult, kernel, stride=self.stride if strided else 1,
                        name=f'conv{i}', dtype=self.dtype)(out)
      out = layers.batch_norm(train, name=f'bn{i}', dtype=self.dtype)(out)
    identity = x
    # CRD's condition: a projection whenever the stride or the width changes.
    if self.stride != 1 or x.shape[-1] != out.shape[-1]:
      identity = layers.conv(out.shape[-1], 1, stride=self.stride,
                             name=f'{self.shortcut_name}_0', dtype=self.dtype)(x)
      identity = layers.batch_norm(train, name=f'{self.shortcut_name}_1',
                                   dtype=self.dtype)(identity)
    out = out + identity
    return layers.block_output(out) if self.fusion_barrier else out


class CifarResNet(nn.Module):
  """CRD's CIFAR ResNet skeleton (3x3 stem, no max pool); returns a `ModelOutput`."""
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  stem_width: int
  branch: Sequence[tuple[int, bool, int]] = BASIC
  num_classes: int = 100
  shortcut_name: str = 'downsample'
  classifier_name: str = 'fc'
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    """Returns `(logits, features)`; `preact` holds each stage's last pre-ReLU residual sum."""
    x = layers.conv(self.stem_width, 3, name='conv1', dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, name='bn1', dtype=self.dtype)(x))
    stem = x
    stages, preact = [], []
    for s, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(num_blocks):
        pre = ResidualBlock(planes, self.branch, stride=2 if s > 0 and b == 0 else 1,
                            shortcut_name=self.shortcut_name, dtype=self.dtype,
                            fusion_barrier=True, name=f'layer{s + 1}_{b}')(x, train)
        x = nn.relu(pre)
      preact.append(pre)
      stages.append(x)
    # CRD uses AvgPool2d(8) (resnet.py) / AdaptiveAvgPool2d(1) (resnetv2.py): both are the
    # global mean on 32x32 inputs; the global mean also keeps other sizes working.
    pooled = layers.global_avg_pool(x)
    logits = layers.linear(self.num_classes, x.shape[-1], name=self.classifier_name,
                           dtype=self.dtype)(pooled)
    return layers.model_output(logits, stem, stages, preact, pooled)


def _crd_resnet(depth: int, filters: tuple[int, int, int, int], doc: str):
  """Returns a registry constructor for CRD's `ResNet(depth, filters, 'basicblock')`."""
  if (depth - 2) % 6:
    raise ValueError(f'BasicBlock CIFAR ResNets have depth 6n+2, got {depth}')
  blocks = (depth - 2) // 6

  def build(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
    return CifarResNet((blocks,) * 3, filters[1:], filters[0], BASIC,
                       num_classes=num_classes, dtype=dtype, **kw)

  build.__doc__ = doc
  return build


_NARROW = (16, 16, 32, 64)  # stem width, then the three stage widths
_X4 = (32, 64, 128, 256)

for _name, _depth, _filters in (
    ('resnet8', 8, _NARROW), ('resnet14', 14, _NARROW), ('resnet20', 20, _NARROW),
    ('resnet32', 32, _NARROW), ('resnet44', 44, _NARROW), ('resnet56', 56, _NARROW),
    ('resnet110', 110, _NARROW), ('resnet8x4', 8, _X4), ('resnet32x4', 32, _X4)):
  register_model(_name)(_crd_resnet(
      _depth, _filters,
      f'Returns CRD\'s CIFAR {_name}: {(_depth - 2) // 6} BasicBlocks per stage, '
      f'widths {_filters}.'))
