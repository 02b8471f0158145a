"""MobileNet (V1), the ImageNet student of ReviewKD's ResNet50 -> MobileNet experiment.

Layout of the authors' `ImageNet/models/mobilenet.py`: one Sequential `model` holding a
`conv_bn` stem (`model.0` = conv, BN, ReLU) and 13 `conv_dw` blocks (`model.i` = depthwise 3x3
conv, BN, ReLU, pointwise 1x1 conv, BN, ReLU), then `fc`. Module names follow the converter's
rule (`model.3.4` -> `model_3_4`), so the authors' checkpoints load as is. No custom init in
their file: PyTorch's defaults (kaiming_uniform(a=sqrt(5)) convs, BN 1/0, default Linear).

Their `AvgPool2d(7)` is a global average pool at 224 px; we pool globally at every size.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models import layers
from reviewkd_jax.models.registry import register_model

_STEM_CHANNELS = 32
# (output channels, stride) of `model.1` ... `model.13`.
_DW_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
              (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# The blocks whose outputs the authors' `extract_feature` taps: 128@56, 256@28, 512@14, 1024@7
# at 224 px (the 64-channel block at 112 px is not a feature level).
_FEATURE_BLOCKS = (3, 5, 11, 13)


class MobileNetV1(nn.Module):
  """The authors' ImageNet MobileNet; returns a `ModelOutput`."""
  num_classes: int = 1000
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> layers.ModelOutput:

    def conv_bn(x, block: int, first: int, features: int, kernel: int, stride: int,
                groups: int = 1):
      # `model.{block}.{first}` conv, `model.{block}.{first + 1}` BN; returns the BN output.
      x = layers.conv(features, kernel, stride=stride, groups=groups, dtype=self.dtype,
                      kernel_init=layers.torch_default_kernel_init,
                      name=f'model_{block}_{first}')(x)
      return layers.batch_norm(train, name=f'model_{block}_{first + 1}', dtype=self.dtype)(x)

    x = nn.relu(conv_bn(x, 0, 0, _STEM_CHANNELS, 3, 2))
    stem = x
    stages, preact = [], []
    for block, (features, stride) in enumerate(_DW_BLOCKS, start=1):
      x = nn.relu(conv_bn(x, block, 0, x.shape[-1], 3, stride, groups=x.shape[-1]))
      pre = conv_bn(x, block, 3, features, 1, 1)
      x = nn.relu(pre)
      if block in _FEATURE_BLOCKS:
        preact.append(pre)
        stages.append(x)
    pooled = layers.global_avg_pool(x)
    logits = layers.linear(self.num_classes, x.shape[-1], name='fc', dtype=self.dtype)(pooled)
    return layers.model_output(logits, stem, stages, preact, pooled)


@register_model('mobilenet_v1')
def mobilenet_v1(num_classes: int = 1000, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns the authors' ImageNet MobileNet (V1, width 1.0)."""
  return MobileNetV1(num_classes=num_classes, dtype=dtype, **kw)
