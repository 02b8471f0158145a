"""ImageNet ResNets (18/34/50/101) in torchvision's layout, so its pretrained weights load as is.

Same as `torchvision.models.resnet`: a 7x7/2 conv stem with a 3x3/2 max pool, four stages of
BasicBlocks or Bottlenecks with the stride on the 3x3 conv (ResNet v1.5), a 1x1 conv + BN
`downsample` shortcut where the shape changes, global average pooling and `fc`. Module names
follow the converter's rule (`layer1.0.downsample.0` -> `layer1_0/downsample_0`).

Features: `preact` is each stage's last residual sum before its ReLU, `stages` the same map
after it. The authors' ImageNet ResNet *reads* as if it returned `preact` (their `is_last`
blocks skip that ReLU), but it then applies `nn.ReLU(inplace=True)` to the returned tensor
itself, so what their ReviewKD distils is `stages` (docs/reviewkd.md, "Feature conventions").
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.cifar_resnet import BASIC, BOTTLENECK, ResidualBlock
from reviewkd_jax.models.registry import register_model

# torchvision's BasicBlock and v1.5 Bottleneck (stride on the 3x3 conv) are the same blocks as
# CRD's CIFAR ones, with the same `downsample` shortcut: one implementation serves both.


def resnet_stages(x: jax.Array, stage_sizes: Sequence[int],
                  branch: Sequence[tuple[int, bool, int]], *, train: bool,
                  dtype: layers.Dtype = jnp.float32
                  ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
  """Builds torchvision's ResNet stem and stages inside the calling module's `nn.compact`
  method (submodules `conv1`, `bn1`, `layer{s}_{b}`: the converter's names) and returns
  (stem, stages, preact). The detectors' bodies call it with `train=False` (frozen BN)."""
  x = layers.conv(64, 7, stride=2, padding=3, name='conv1', dtype=dtype)(x)
  x = nn.relu(layers.batch_norm(train, name='bn1', dtype=dtype)(x))
  x = layers.max_pool(x, 3, 2, padding=1)
  stem = x
  stages, preact = [], []
  for s, num_blocks in enumerate(stage_sizes):
    for b in range(num_blocks):
      pre = ResidualBlock(64 * 2**s, branch, stride=2 if s > 0 and b == 0 else 1,
                          dtype=dtype, name=f'layer{s + 1}_{b}')(x, train)
      x = nn.relu(pre)
    preact.append(pre)
    stages.append(x)
  return stem, stages, preact


class ImageNetResNet(nn.Module):
  """torchvision's ResNet; returns a `ModelOutput`."""
  stage_sizes: Sequence[int]
  branch: Sequence[tuple[int, bool, int]]
  num_classes: int = 1000
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:
    stem, stages, preact = resnet_stages(x, self.stage_sizes, self.branch, train=train,
                                         dtype=self.dtype)
    pooled = layers.global_avg_pool(stages[-1])
    logits = layers.linear(self.num_classes, stages[-1].shape[-1], name='fc',
                           dtype=self.dtype)(pooled)
    return layers.model_output(logits, stem, stages, preact, pooled)


@register_model('resnet18')
def resnet18(num_classes: int = 1000, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns torchvision's ResNet-18 (BasicBlocks 2-2-2-2)."""
  return ImageNetResNet((2, 2, 2, 2), BASIC, num_classes=num_classes, dtype=dtype, **kw)


@register_model('resnet34')
def resnet34(num_classes: int = 1000, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns torchvision's ResNet-34 (BasicBlocks 3-4-6-3)."""
  return ImageNetResNet((3, 4, 6, 3), BASIC, num_classes=num_classes, dtype=dtype, **kw)


@register_model('resnet50')
def resnet50(num_classes: int = 1000, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns torchvision's ResNet-50 (Bottlenecks 3-4-6-3)."""
  return ImageNetResNet((3, 4, 6, 3), BOTTLENECK, num_classes=num_classes, dtype=dtype, **kw)


@register_model('resnet101')
def resnet101(num_classes: int = 1000, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns torchvision's ResNet-101 (Bottlenecks 3-4-23-3)."""
  return ImageNetResNet((3, 4, 23, 3), BOTTLENECK, num_classes=num_classes, dtype=dtype, **kw)
