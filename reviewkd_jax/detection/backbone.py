"""The detectors' backbones: a ResNet or MobileNetV2 body with frozen BatchNorm, and an FPN.

`Backbone(x)` maps normalised NHWC images to {'p2', ..., 'p6'} (`fpn_channels` channels at
strides 4 to 64; with `with_body=True` also the body's 'c2'..'c5'). The module tree is pinned
so that Detectron2's and torchvision's weights convert (`detection/weights.py`): the ResNet
body is `models.imagenet_resnet.resnet_stages` with frozen BN (`stride_in_1x1` for the MSRA
ResNets), the MobileNetV2 body torchvision's `features` names, the FPN `lateral_{2..5}` and
`output_{2..5}`. `frozen_param_mask` is Detectron2's FREEZE_AT. How each part follows
Detectron2 and torchvision: docs/detection.md, "Module notes".
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from reviewkd_jax.models import layers
from reviewkd_jax.models.cifar_resnet import BASIC, BOTTLENECK
from reviewkd_jax.models.imagenet_resnet import resnet_stages

# Bottleneck with the stride on the first 1x1 conv (Detectron2's STRIDE_IN_1X1=True, MSRA).
BOTTLENECK_STRIDE_IN_1X1 = ((1, True, 1), (3, False, 1), (1, False, 4))

# name -> (blocks per stage, bottleneck?)
RESNETS = {
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
}
BACKBONES = (*RESNETS, 'mobilenet_v2')

# torchvision's MobileNetV2 inverted residual setting: (expansion t, channels c, blocks n,
# first stride s) per block group; features.1 .. features.17 in order.
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Indices into `features` whose outputs are C2, C3, C4 and C5 (without `last_conv`).
MOBILENET_V2_OUTPUTS = (3, 6, 13, 17)
# Detectron2-style stage (1 = stem, 2 = res2, ...) of each `features` index, for FREEZE_AT:
# the block groups that end at strides 4, 8, 16, 32, as in the ReviewKD authors' MobileNetV2.
_MV2_STAGE_ENDS = (0, 3, 6, 13, 18)


def _mobilenet_v2_stage(index: int) -> int:
  return next(s for s, end in enumerate(_MV2_STAGE_ENDS, start=1) if index <= end)


def _frozen_bn(name: str, dtype) -> layers.BatchNorm:
  """Returns a BatchNorm that always uses its stored statistics (FrozenBatchNorm2d)."""
  return layers.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=name)


class ResNetBody(nn.Module):
  """A ResNet without pooling and classifier; returns [C2, C3, C4, C5] (post-ReLU).

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    bottleneck: Bottlenecks (50/101) or BasicBlocks (18/34).
    stride_in_1x1: Detectron2's STRIDE_IN_1X1 (MSRA ResNets); ignored for BasicBlocks.
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  stride_in_1x1: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if not self.bottleneck:
      branch = BASIC
    else:
      branch = BOTTLENECK_STRIDE_IN_1X1 if self.stride_in_1x1 else BOTTLENECK
    _, stages, _ = resnet_stages(x.astype(self.dtype), self.stage_sizes, branch, train=False,
                                 dtype=self.dtype)
    return stages


class InvertedResidual(nn.Module):
  """torchvision's MobileNetV2 block, with its submodule names under the converter's rule.

  Expansion 1: conv_0_0 (depthwise 3x3), conv_0_1 (BN), ReLU6, conv_1 (1x1), conv_2 (BN).
  Otherwise: conv_0_0 (1x1 expand), conv_0_1, ReLU6, conv_1_0 (depthwise 3x3), conv_1_1,
  ReLU6, conv_2 (1x1 linear projection), conv_3 (BN). Identity shortcut when the stride is 1
  and the width is kept.
  """
  out_channels: int
  stride: int
  expand_ratio: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    hidden = int(round(cin * self.expand_ratio))
    conv = lambda *a, **k: layers.conv(*a, dtype=self.dtype, **k)  # noqa: E731
    bn = lambda name: _frozen_bn(name, self.dtype)  # noqa: E731
    if self.expand_ratio == 1:
      out = conv(hidden, 3, stride=self.stride, groups=hidden, name='conv_0_0')(x)
      out = nn.relu6(bn('conv_0_1')(out))
      out = bn('conv_2')(conv(self.out_channels, 1, name='conv_1')(out))
    else:
      out = nn.relu6(bn('conv_0_1')(conv(hidden, 1, name='conv_0_0')(x)))
      out = conv(hidden, 3, stride=self.stride, groups=hidden, name='conv_1_0')(out)
      out = nn.relu6(bn('conv_1_1')(out))
      out = bn('conv_3')(conv(self.out_channels, 1, name='conv_2')(out))
    if self.stride == 1 and cin == self.out_channels:
      out = x + out
    return out


class MobileNetV2Body(nn.Module):
  """torchvision's `mobilenet_v2().features` (width 1.0); returns [C2, C3, C4, C5].

  C2..C5 are the outputs of features.3, .6, .13 and .17 (24, 32, 96, 320 channels), as the
  ReviewKD authors' Detectron2 MobileNetV2; with `last_conv`, features.18 (1x1 conv to 1280,
  BN, ReLU6) follows and C5 is its output. See the module docstring.
  """
  last_conv: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = x.astype(self.dtype)
    x = layers.conv(32, 3, stride=2, name='features_0_0', dtype=self.dtype)(x)
    x = nn.relu6(_frozen_bn('features_0_1', self.dtype)(x))
    outputs, index = [], 0
    for t, c, n, s in MOBILENET_V2_SETTING:
      for i in range(n):
        index += 1
        x = InvertedResidual(c, s if i == 0 else 1, t, dtype=self.dtype,
                             name=f'features_{index}')(x)
        if index in MOBILENET_V2_OUTPUTS:
          outputs.append(x)
    if self.last_conv:
      x = layers.conv(1280, 1, name='features_18_0', dtype=self.dtype)(x)
      outputs[-1] = nn.relu6(_frozen_bn('features_18_1', self.dtype)(x))
    return outputs


class FPN(nn.Module):
  """Feature Pyramid Network with a P6 max-pool level; returns {'p2', ..., 'p6'}."""
  channels: int = 256
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> dict[str, jax.Array]:
    if len(features) != 4:
      raise ValueError(f'FPN takes C2..C5, got {len(features)} maps')

    def conv(kernel: int, name: str) -> nn.Conv:
      return layers.conv(self.channels, kernel, use_bias=True, name=name, dtype=self.dtype,
                         kernel_init=layers.kaiming_uniform_a1)

    out = {}
    prev = None
    for level in (5, 4, 3, 2):
      lateral = conv(1, f'lateral_{level}')(features[level - 2])
      if prev is not None:
        lateral = lateral + layers.nearest_resize(prev, lateral.shape[1:3])
      prev = lateral
      out[f'p{level}'] = conv(3, f'output_{level}')(lateral)
    out['p6'] = out['p5'][:, ::2, ::2]  # max_pool2d(P5, kernel_size=1, stride=2)
    return {f'p{level}': out[f'p{level}'] for level in range(2, 7)}


class Backbone(nn.Module):
  """Body + FPN (submodules `body` and `fpn`); NHWC images -> {'p2', ..., 'p6'}.

  Attributes:
    arch: one of `BACKBONES`.
    stride_in_1x1: Detectron2's STRIDE_IN_1X1 for the ResNet-50/101 bodies (True for the
      Detectron2 model-zoo detectors and MSRA ImageNet weights, False for torchvision's).
    last_conv: MobileNetV2 only: C5 is features.18's 1280 channels instead of features.17's
      320 (the ReviewKD student).
    fpn_channels: the FPN's width (256 in every config).
    with_body: also return the body's maps as 'c2'..'c5'.
  """
  arch: str = 'resnet50'
  stride_in_1x1: bool = False
  last_conv: bool = False
  fpn_channels: int = 256
  with_body: bool = False
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    if self.arch in RESNETS:
      sizes, bottleneck = RESNETS[self.arch]
      self.body = ResNetBody(sizes, bottleneck, self.stride_in_1x1, dtype=self.dtype)
    elif self.arch == 'mobilenet_v2':
      self.body = MobileNetV2Body(self.last_conv, dtype=self.dtype)
    else:
      raise ValueError(f'Unknown backbone {self.arch!r}; choose one of {BACKBONES}')
    self.fpn = FPN(self.fpn_channels, dtype=self.dtype)

  def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """Returns the pyramid; `train` changes nothing (frozen BatchNorm) and is accepted for
    a uniform call signature."""
    del train
    body = self.body(x)
    out = self.fpn(body)
    if self.with_body:
      out.update({f'c{i + 2}': c for i, c in enumerate(body)})
    return out


def build_backbone(name: str, *, stride_in_1x1: bool = False, last_conv: bool = False,
                   fpn_channels: int = 256, with_body: bool = False,
                   dtype: Any = jnp.float32) -> Backbone:
  """Returns the `Backbone` called `name` ('resnet18', 'resnet34', 'resnet50', 'resnet101',
  'mobilenet_v2'). Pass `stride_in_1x1=True` for Detectron2 model-zoo ResNet-50/101 weights."""
  if name not in BACKBONES:
    raise ValueError(f'Unknown backbone {name!r}; choose one of {BACKBONES}')
  return Backbone(name, stride_in_1x1=stride_in_1x1, last_conv=last_conv,
                  fpn_channels=fpn_channels, with_body=with_body, dtype=dtype)


_RESNET_LAYER = re.compile(r'^layer(\d+)_\d+$')
_MV2_FEATURE = re.compile(r'^features_(\d+)(_\d+)?$')


def body_module_stage(module: str) -> int:
  """Returns the Detectron2 stage (1 = stem, 2 = res2, ..., 5 = res5) of a body module name."""
  if module in ('conv1', 'bn1'):
    return 1
  m = _RESNET_LAYER.match(module)
  if m:
    return int(m.group(1)) + 1
  m = _MV2_FEATURE.match(module)
  if m:
    return _mobilenet_v2_stage(int(m.group(1)))
  raise ValueError(f'Not a backbone body module: {module!r}')


def frozen_param_mask(params: Any, freeze_at: int = 2, *,
                      body_path: Sequence[str] = ('backbone', 'body')) -> Any:
  """Returns a pytree of bools shaped like `params`: True where a parameter is frozen.

  Frozen: every parameter of the body's stages 1..`freeze_at` (Detectron2's FREEZE_AT:
  0 nothing, 1 the stem, 2 the stem and res2 (default), ... 5 the whole body), and the
  `scale`/`bias` of every BatchNorm in the body (FrozenBN; in PyTorch they are buffers).
  Everything outside the body (FPN, heads, distillation modules, their BatchNorms) is
  trainable. `params` may be the detector's params, its variables dict (with 'params'), or any
  tree holding `body_path` as a run of keys (e.g. ('student', 'backbone', 'body')).

  Use with optax, e.g.
    labels = jax.tree_util.tree_map(lambda f: 'frozen' if f else 'train', mask)
    tx = optax.multi_transform({'train': sgd, 'frozen': optax.set_to_zero()}, labels)
  """
  if not 0 <= freeze_at <= 5:
    raise ValueError(f'freeze_at must be in 0..5, got {freeze_at}')
  body_path = tuple(body_path)
  flat = traverse_util.flatten_dict(params)
  # BatchNorm modules: params `scale`/`bias`, batch_stats `mean`/`var`.
  norm_modules = {path[:-1] for path in flat if path[-1] in ('scale', 'mean', 'var')}
  mask = {}
  for path in flat:
    start = next((i for i in range(len(path) - len(body_path))
                  if path[i:i + len(body_path)] == body_path), None)
    if start is None:
      mask[path] = False
      continue
    module = path[start + len(body_path)]
    mask[path] = body_module_stage(module) <= freeze_at or path[:-1] in norm_modules
  return traverse_util.unflatten_dict(mask)
