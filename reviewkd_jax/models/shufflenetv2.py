"""ShuffleNetV2 for CIFAR-100 as in the CRD benchmark (RepDistiller `models/ShuffleNetv2.py`).

CIFAR variant: the 1x1 stem conv 3->24 (no max-pool), three stages of one stride-2 `DownBlock`
(torch index 0) followed by `BasicBlock`s, then a 1x1 conv to 1024 channels before pooling.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model
from reviewkd_jax.models.shufflenetv1 import channel_shuffle, shuffle_stem

# CRD's ShuffleNetV2 has no init code: PyTorch's default conv init.
_conv = functools.partial(layers.conv, kernel_init=layers.torch_default_kernel_init)


class BasicBlock(nn.Module):
  """Stride-1 unit; returns `(out, preact)`.

  As in CRD, `preact` is `concat([x1, bn3(...)])` *before* the channel shuffle, so
  `out == channel_shuffle(relu(preact), 2)` (x1 is already non-negative).
  """
  split_ratio: float = 0.5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    c = int(x.shape[-1] * self.split_ratio)
    x1, x2 = x[..., :c], x[..., c:]
    bn = lambda name: layers.batch_norm(train, name=name, dtype=self.dtype)  # noqa: E731
    conv = functools.partial(_conv, dtype=self.dtype)
    out = nn.relu(bn('bn1')(conv(c, 1, name='conv1')(x2)))
    out = bn('bn2')(conv(c, 3, groups=c, name='conv2')(out))
    branch = bn('bn3')(conv(c, 1, name='conv3')(out))
    preact = jnp.concatenate([x1, branch], axis=-1)
    out = jnp.concatenate([x1, nn.relu(branch)], axis=-1)
    return channel_shuffle(out, 2), preact


class DownBlock(nn.Module):
  """Stride-2 unit with two branches (left: dw3x3 -> 1x1; right: 1x1 -> dw3x3 -> 1x1)."""
  out_channels: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cin, mid = x.shape[-1], self.out_channels // 2
    bn = lambda name: layers.batch_norm(train, name=name, dtype=self.dtype)  # noqa: E731
    conv = functools.partial(_conv, dtype=self.dtype)
    left = bn('bn1')(conv(cin, 3, stride=2, groups=cin, name='conv1')(x))
    left = nn.relu(bn('bn2')(conv(mid, 1, name='conv2')(left)))
    right = nn.relu(bn('bn3')(conv(mid, 1, name='conv3')(x)))
    right = bn('bn4')(conv(mid, 3, stride=2, groups=mid, name='conv4')(right))
    right = nn.relu(bn('bn5')(conv(mid, 1, name='conv5')(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """CRD's CIFAR ShuffleNetV2; returns a `ModelOutput` (see `reviewkd_jax.models`)."""
  out_channels: Sequence[int] = (116, 232, 464, 1024)  # three stages, then the last 1x1 conv
  num_blocks: Sequence[int] = (3, 7, 3)  # BasicBlocks per stage, after its DownBlock
  num_classes: int = 100
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    x = x.astype(self.dtype)
    out = shuffle_stem(x, train, self.dtype)
    stem = out
    stages, preacts = [], []
    for s, (channels, blocks) in enumerate(zip(self.out_channels[:3], self.num_blocks)):
      out = DownBlock(channels, dtype=self.dtype, name=f'layer{s + 1}_0')(out, train)
      for i in range(blocks):
        out, preact = BasicBlock(dtype=self.dtype, name=f'layer{s + 1}_{i + 1}')(out, train)
      stages.append(out)
      preacts.append(preact)
    last = self.out_channels[3]
    out = _conv(last, 1, name='conv2', dtype=self.dtype)(out)
    out = nn.relu(layers.batch_norm(train, name='bn2', dtype=self.dtype)(out))
    # CRD's F.avg_pool2d(out, 4) on the 4x4 map of a 32x32 input: a global average.
    pooled = layers.global_avg_pool(out)
    logits = layers.linear(self.num_classes, last, name='linear', dtype=self.dtype)(pooled)
    return layers.model_output(logits, stem, stages, preacts, pooled)


@register_model('ShuffleV2')
def shuffle_v2(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns CRD's `ShuffleV2` (net_size 1: 116/232/464/1024 channels; 3/7/3 blocks)."""
  return ShuffleNetV2(num_classes=num_classes, dtype=dtype, **kw)
