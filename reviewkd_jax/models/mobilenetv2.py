"""MobileNetV2 for CIFAR-100 as in the CRD benchmark (RepDistiller `models/mobilenetv2.py`).

CRD's `mobile_half`: expansion 6, width 0.5, CIFAR strides (the stem has stride 2 and the
seven block groups 1,1,2,2,1,2,1, so 32 px -> 16 -> 2). Unlike torchvision, every block keeps
its expansion conv (also when the expansion is 1) and widths are truncated with `int()`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model

# (expansion or None for the network's T, channels, blocks, first stride) per block group.
_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))

# CRD's init: normal(0, sqrt(2 / (k*k*out_channels))), i.e. kaiming fan-out, for every conv.
_conv = functools.partial(layers.conv, kernel_init=layers.kaiming_normal_fan_out)


class InvertedResidual(nn.Module):
  """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection; identity shortcut when shapes allow.

  Submodules are named after CRD's `conv` Sequential indices (ReLUs sit at 2 and 5).
  """
  out_channels: int
  stride: int
  expand_ratio: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cin = x.shape[-1]
    hidden = cin * self.expand_ratio
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = lambda name: layers.batch_norm(train, name=name, dtype=self.dtype)  # noqa: E731
    out = nn.relu(bn('conv_1')(conv(hidden, 1, name='conv_0')(x)))
    out = conv(hidden, 3, stride=self.stride, groups=hidden, name='conv_3')(out)
    out = nn.relu(bn('conv_4')(out))
    out = bn('conv_7')(conv(self.out_channels, 1, name='conv_6')(out))
    if self.stride == 1 and cin == self.out_channels:
      out = x + out
    return out


class MobileNetV2(nn.Module):
  """CRD's CIFAR MobileNetV2; returns a `ModelOutput` (see `reviewkd_jax.models`).

  The features are the outputs of block groups `feature_blocks` (CRD's f1..f4). These blocks
  end in a linear projection with no activation, so `stages` and `preact` are the same arrays,
  as in CRD, whose forward ignores its `preact` flag.
  """
  expand_ratio: int = 6
  width_mult: float = 0.5
  feature_blocks: Sequence[int] = (1, 2, 4, 6)
  num_classes: int = 100
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    x = x.astype(self.dtype)
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = lambda name: layers.batch_norm(train, name=name, dtype=self.dtype)  # noqa: E731
    out = conv(int(32 * self.width_mult), 3, stride=2, name='conv1_0')(x)
    out = nn.relu(bn('conv1_1')(out))
    stem = out
    stages = []
    for g, (t, c, n, s) in enumerate(_SETTING):
      for i in range(n):
        out = InvertedResidual(int(c * self.width_mult), stride=s if i == 0 else 1,
                               expand_ratio=self.expand_ratio if t is None else t,
                               dtype=self.dtype, name=f'blocks_{g}_{i}')(out, train)
      if g in self.feature_blocks:
        stages.append(out)
    last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    out = nn.relu(bn('conv2_1')(conv(last, 1, name='conv2_0')(out)))
    # CRD's AvgPool2d(input_size // 16, ceil_mode=True) covers the whole 2x2 map at 32 px.
    pooled = layers.global_avg_pool(out)
    logits = layers.linear(self.num_classes, last, name='classifier_0', dtype=self.dtype,
                           kernel_init=nn.initializers.normal(0.01),
                           bias_init=nn.initializers.zeros)(pooled)
    return layers.model_output(logits, stem, stages, stages, pooled)


@register_model('MobileNetV2')
def mobilenetv2(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns CRD's `MobileNetV2` (their `mobile_half`: expansion 6, width 0.5)."""
  return MobileNetV2(num_classes=num_classes, dtype=dtype, **kw)
