"""Wide ResNets of the CRD benchmark (RepDistiller `models/wrn.py`): wrn_16_1 ... wrn_40_2.

Pre-activation network: a bare 3x3 conv stem, three `NetworkBlock`s (`block1..3`, each a
`layer` of BasicBlocks that start with BN-ReLU), then `bn1`-ReLU, global average pooling and
`fc`. Module names follow the converter's rule (`block1.layer.0.bn1` -> `block1/layer_0/bn1`).

Features, as CRD's forward returns them:
- `stem` is the raw conv1 output (the network has no activation there);
- `stages` are the raw block outputs (residual sums: no ReLU follows them until the next
  block's BN-ReLU);
- `preact` of stage i is the next stage's first `bn1` applied to the stage output (no ReLU),
  and for the last stage the final `bn1`. We capture those BN outputs where the forward
  applies them anyway instead of applying the BNs a second time as CRD does;
- `pooled` is avgpool(relu(bn1(last stage))).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model


class WideBasicBlock(nn.Module):
  """CRD's WRN BasicBlock (BN-ReLU-conv x2, 1x1 `convShortcut` when the width changes)."""
  out_planes: int
  stride: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns (block output, bn1(x)); bn1(x) is the previous stage's `preact`."""
    normed = layers.batch_norm(train, name='bn1', dtype=self.dtype)(x)
    act = nn.relu(normed)
    # CRD: with equal widths the shortcut is the raw input; otherwise the 1x1 projection of
    # the *activated* input (its forward overwrites x with relu(bn1(x)) in that case).
    if x.shape[-1] == self.out_planes:
      shortcut = x
    else:
      shortcut = layers.conv(self.out_planes, 1, stride=self.stride, padding=0,
                             name='convShortcut', dtype=self.dtype)(act)
    out = layers.conv(self.out_planes, 3, stride=self.stride, name='conv1',
                      dtype=self.dtype)(act)
    out = nn.relu(layers.batch_norm(train, name='bn2', dtype=self.dtype)(out))
    out = layers.conv(self.out_planes, 3, name='conv2', dtype=self.dtype)(out)
    return shortcut + out, normed


class NetworkBlock(nn.Module):
  """CRD's NetworkBlock: `num_layers` WideBasicBlocks named `layer_0`, `layer_1`, ..."""
  num_layers: int
  out_planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns (stage output, the first block's bn1 applied to the stage input)."""
    entry_bn = None
    for i in range(self.num_layers):
      x, normed = WideBasicBlock(self.out_planes, self.stride if i == 0 else 1,
                                 dtype=self.dtype, name=f'layer_{i}')(x, train)
      if i == 0:
        entry_bn = normed
    return x, entry_bn


class WideResNet(nn.Module):
  """CRD's WideResNet(depth, widen_factor) without dropout; returns a `ModelOutput`."""
  depth: int
  widen_factor: int
  num_classes: int = 100
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    """Returns `(logits, features)` with the WRN feature conventions of the module doc."""
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n+4, got {self.depth}')
    n = (self.depth - 4) // 6
    k = self.widen_factor
    x = layers.conv(16, 3, name='conv1', dtype=self.dtype)(x)
    stem = x
    stages, entry_bns = [], []
    for s, width in enumerate((16 * k, 32 * k, 64 * k)):
      x, entry_bn = NetworkBlock(n, width, 1 if s == 0 else 2, dtype=self.dtype,
                                 name=f'block{s + 1}')(x, train)
      stages.append(x)
      entry_bns.append(entry_bn)
    final_bn = layers.batch_norm(train, name='bn1', dtype=self.dtype)(x)
    # entry_bns[0] normalises the stem (block1's input), which no stage feature uses.
    preact = entry_bns[1:] + [final_bn]
    pooled = layers.global_avg_pool(nn.relu(final_bn))
    # CRD zeroes the Linear bias and leaves its weight at PyTorch's default init.
    logits = layers.linear(self.num_classes, x.shape[-1], name='fc', dtype=self.dtype,
                           bias_init=nn.initializers.zeros)(pooled)
    return layers.model_output(logits, stem, stages, preact, pooled)


def _crd_wrn(depth: int, widen_factor: int):
  """Returns a registry constructor for CRD's `WideResNet(depth, widen_factor)`."""

  def build(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
    return WideResNet(depth, widen_factor, num_classes=num_classes, dtype=dtype, **kw)

  build.__doc__ = f'Returns CRD\'s WRN-{depth}-{widen_factor} for CIFAR.'
  return build


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
  register_model(f'wrn_{_depth}_{_k}')(_crd_wrn(_depth, _k))
