"""ShuffleNetV1 for CIFAR-100 as in the CRD benchmark (RepDistiller `models/ShuffleNetv1.py`).

CIFAR variant: a 1x1 stem conv 3->24 with no max-pool, three stages of bottlenecks whose first
block has stride 2 and concatenates an average-pooled shortcut. Also holds the helpers the
ShuffleNetV2 family shares (`channel_shuffle`, `shuffle_stem`).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model

# The CIFAR stem's width in both CRD ShuffleNets.
STEM_CHANNELS = 24


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """Returns NHWC `x` with channels shuffled like PyTorch's NCHW channel shuffle.

  PyTorch's `x.view(N, g, C//g, H, W).permute(0, 2, 1, 3, 4)` sends channel `i * C//g + j` to
  position `j * g + i`; on the NHWC layout that is the same reshape/transpose of the last axis.
  """
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def shuffle_stem(x: jax.Array, train: bool, dtype) -> jax.Array:
  """Returns relu(bn1(conv1(x))), the CRD ShuffleNets' 1x1 CIFAR stem, built in the caller."""
  x = layers.conv(STEM_CHANNELS, 1, name='conv1', dtype=dtype,
                  kernel_init=layers.torch_default_kernel_init)(x)
  return nn.relu(layers.batch_norm(train, name='bn1', dtype=dtype)(x))


class Bottleneck(nn.Module):
  """ShuffleNetV1 unit; returns `(out, preact)` where `out = relu(preact)`."""
  out_planes: int  # channels of the residual branch (CRD subtracts the shortcut's on stride 2)
  stride: int
  groups: int
  conv1_groups: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    mid = int(self.out_planes / 4)
    kw = dict(dtype=self.dtype, kernel_init=layers.torch_default_kernel_init)
    bn = lambda name: layers.batch_norm(train, name=name, dtype=self.dtype)  # noqa: E731
    out = layers.conv(mid, 1, groups=self.conv1_groups, name='conv1', **kw)(x)
    out = nn.relu(bn('bn1')(out))
    out = channel_shuffle(out, self.conv1_groups)
    out = layers.conv(mid, 3, stride=self.stride, groups=mid, name='conv2', **kw)(out)
    out = nn.relu(bn('bn2')(out))
    out = bn('bn3')(layers.conv(self.out_planes, 1, groups=self.groups, name='conv3', **kw)(out))
    if self.stride == 2:
      preact = jnp.concatenate([out, layers.avg_pool(x, 3, 2, padding=1)], axis=-1)
    else:
      preact = out + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """CRD's CIFAR ShuffleNetV1; returns a `ModelOutput` (see `reviewkd_jax.models`)."""
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  num_classes: int = 100
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    x = x.astype(self.dtype)
    out = shuffle_stem(x, train, self.dtype)
    stem = out
    stages, preacts = [], []
    in_planes = STEM_CHANNELS
    for s, (planes, blocks) in enumerate(zip(self.out_planes, self.num_blocks)):
      for i in range(blocks):
        # The stride-2 first block concatenates its input, so its branch makes the rest.
        branch = planes - in_planes if i == 0 else planes
        # CRD's rule: the first 1x1 conv is ungrouped when the input has 24 channels, which
        # in every CRD config is exactly the first block (fed by the stem).
        out, preact = Bottleneck(
            branch, stride=2 if i == 0 else 1, groups=self.groups,
            conv1_groups=1 if in_planes == STEM_CHANNELS else self.groups,
            dtype=self.dtype, name=f'layer{s + 1}_{i}')(out, train)
        in_planes = planes
      stages.append(out)
      preacts.append(preact)  # CRD's `is_last` block returns its pre-ReLU sum
    # CRD's F.avg_pool2d(out, 4) on the 4x4 map of a 32x32 input: a global average.
    pooled = layers.global_avg_pool(out)
    logits = layers.linear(self.num_classes, self.out_planes[-1], name='linear',
                           dtype=self.dtype)(pooled)
    return layers.model_output(logits, stem, stages, preacts, pooled)


@register_model('ShuffleV1')
def shuffle_v1(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns CRD's `ShuffleV1` (groups 3; 240/480/960 channels; 4/8/4 blocks)."""
  return ShuffleNetV1(num_classes=num_classes, dtype=dtype, **kw)
