"""VGGs with BatchNorm of the CRD benchmark (RepDistiller `models/vgg.py`, the `*_bn` variants).

Registered under the plain names (vgg8, vgg11, vgg13, vgg16, vgg19) as in the KD literature,
but every one has BatchNorm. Five conv blocks `block0..block4` (PyTorch Sequentials of
conv(bias)-BN-ReLU with the final ReLU dropped, so `block0.3` is the second conv and
`block0.4` its BN -> Flax `block0_3`, `block0_4`), 2x2 max pools between blocks 0-1, 1-2 and
2-3, a global average pool (`pool4`) and `classifier` = Linear(512, num_classes).

CRD's forward applies `pool3` only when the input is 64 px high (Tiny-ImageNet): on CIFAR
`block4` runs at `block3`'s 4x4 size. We match that. Features: `stem` = relu(block0),
`stages` = relu(block1..4), `preact` = block1..4 (ending in BN), `pooled` = pool4.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model

# Conv widths per block (CRD's cfg 'S', 'A', 'B', 'D', 'E').
_CFGS = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    'vgg19': ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
  """CRD's CIFAR VGG with BatchNorm; returns a `ModelOutput`."""
  cfg: Sequence[Sequence[int]]
  num_classes: int = 100
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    """Returns `(logits, features)`; `preact` holds each block's output before its ReLU."""
    pool_before_last = x.shape[1] == 64  # CRD's `if h == 64: x = self.pool3(x)`
    preact, post = [], []
    for i, widths in enumerate(self.cfg):
      if 0 < i < len(self.cfg) - 1 or (i == len(self.cfg) - 1 and pool_before_last):
        x = layers.max_pool(x, 2, 2)
      for j, width in enumerate(widths):
        if j > 0:
          x = nn.relu(x)
        # Sequential indices: conv, BN, ReLU per conv (3 * j and 3 * j + 1).
        x = layers.conv(width, 3, use_bias=True, name=f'block{i}_{3 * j}',
                        dtype=self.dtype)(x)
        x = layers.batch_norm(train, name=f'block{i}_{3 * j + 1}', dtype=self.dtype)(x)
      preact.append(x)
      x = nn.relu(x)
      post.append(x)
    pooled = layers.global_avg_pool(x)
    # CRD's _initialize_weights: Linear weight N(0, 0.01), bias 0 (conv biases are 0 too).
    logits = layers.linear(self.num_classes, x.shape[-1], name='classifier', dtype=self.dtype,
                           kernel_init=nn.initializers.normal(0.01),
                           bias_init=nn.initializers.zeros)(pooled)
    return layers.model_output(logits, post[0], post[1:], preact[1:], pooled)


def _crd_vgg(name: str):
  """Returns a registry constructor for CRD's `<name>_bn`."""
  cfg = _CFGS[name]

  def build(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
    return VGG(cfg, num_classes=num_classes, dtype=dtype, **kw)

  build.__doc__ = f'Returns CRD\'s {name}_bn (conv widths per block {cfg}).'
  return build


for _name in _CFGS:
  register_model(_name)(_crd_vgg(_name))
