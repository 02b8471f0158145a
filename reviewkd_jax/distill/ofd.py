"""'ofd': A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019), as its
authors' code and mdistiller run it: connectors map the student's pre-ReLU stage maps
(`features['preact']`) to the teacher's channels, compared by `losses.ofd_loss` with the
teacher's maps clipped at per-channel margins; weight `ofd_weight` (1e-3), connector kernel
`ofd_connector_kernel` (1).

The margins are the expected negative response of the teacher BatchNorm that feeds each
pre-ReLU map (`ofd_bn_paths`), as the authors' `get_bn_before_relu` chooses it: for ResNets
the last BN of the last block's residual branch (the shortcut is ignored, as in their code),
for WRN the next block's `bn1` and finally the network's `bn1`, for VGG each block's last
BN. The teacher runs with batch statistics in both OFD's and mdistiller's code
(`teacher_bn_mode`; configs/cifar100_table1.py sets 'batch_stats' for ofd).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reviewkd_jax import losses
from reviewkd_jax.distill import base
from reviewkd_jax.models import create_model
from reviewkd_jax.models import layers
from reviewkd_jax.models.cifar_resnet import CifarResNet
from reviewkd_jax.models.imagenet_resnet import ImageNetResNet
from reviewkd_jax.models.vgg import VGG
from reviewkd_jax.models.wrn import WideResNet


class OFDConnector(nn.Module):
  """OFD's connector: conv (no bias, N(0, 2 / (k^2 C_out))) + BN, student -> teacher channels.

  Input: one of the student's pre-ReLU stage maps (N, H, W, Cs); output (N, H, W,
  teacher_channels), compared to the teacher's pre-ReLU map by `losses.ofd_loss`.
  """
  teacher_channels: int
  kernel_size: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns the connected student feature."""
    x = layers.conv(self.teacher_channels, self.kernel_size,
                    padding=(self.kernel_size - 1) // 2,
                    kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
                    name='conv')(x)
    return layers.batch_norm(train, name='bn', dtype=self.dtype)(x)


def _std_normal_cdf(x: np.ndarray) -> np.ndarray:
  return 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2.0))


def ofd_margin(bn_scale, bn_bias) -> np.ndarray:
  """Returns OFD's per-channel margin, E[x | x < 0] for x ~ N(bias, |scale|^2), float32.

  That is `m - s phi(m/s) / Phi(-m/s)`; where `Phi(-m/s) <= 0.001` (almost never
  negative) the margin is `-3 s`, as in the authors' `get_margin_from_BN`. The inputs are
  the `scale` and `bias` of the teacher BatchNorm that precedes the ReLU; computed once,
  in float64 on the host.
  """
  s = np.abs(np.asarray(bn_scale, np.float64).reshape(-1))
  m = np.asarray(bn_bias, np.float64).reshape(-1)
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = np.where(s > 0, m / np.where(s > 0, s, 1.0), np.where(m > 0, np.inf, -np.inf))
    cdf = _std_normal_cdf(-ratio)
    gauss = np.where(cdf > 0.001,
                     -s * np.exp(-ratio**2 / 2) / math.sqrt(2 * math.pi) / cdf + m,
                     -3.0 * s)
  return gauss.astype(np.float32)


def _lookup(tree: Mapping[str, Any], path: str | Sequence[str]) -> Any:
  keys = path.split('/') if isinstance(path, str) else path
  for k in keys:
    tree = tree[k]
  return tree


def ofd_margins_from_params(teacher_params: Mapping[str, Any],
                            bn_paths: Sequence[str | Sequence[str]]) -> list[np.ndarray]:
  """Returns `ofd_margin` of each BatchNorm at `bn_paths` ('stage/block/bn' or key tuples).

  `teacher_params` is the teacher's `variables['params']`; each path names a BN module
  holding `scale` and `bias` (OFD's `get_bn_before_relu`: the BN whose output is the
  pre-ReLU feature, shallow to deep).
  """
  margins = []
  for path in bn_paths:
    bn = _lookup(teacher_params, path)
    margins.append(ofd_margin(jax.device_get(bn['scale']), jax.device_get(bn['bias'])))
  return margins


class OFDHead(nn.Module):
  """OFD's connectors on the student's pre-ReLU stage maps; returns one map per stage."""
  teacher_channels: Sequence[int]
  kernel_size: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: dict, train: bool) -> list:
    """Returns the connected student maps, with the teacher's channels."""
    return [OFDConnector(c, self.kernel_size, dtype=self.dtype, name=f'connector_{i}')(f, train)
            for i, (f, c) in enumerate(zip(features['preact'], self.teacher_channels))]


def ofd_bn_paths(model: nn.Module) -> list[str]:
  """Returns the param paths of the teacher BNs before each pre-ReLU stage map (the margins).

  Raises ValueError for a family whose pre-ReLU maps have no such BatchNorm defined here.
  """
  if isinstance(model, (CifarResNet, ImageNetResNet)):
    return [f'layer{s + 1}_{n - 1}/bn{len(model.branch)}'
            for s, n in enumerate(model.stage_sizes)]
  if isinstance(model, WideResNet):
    return ['block2/layer_0/bn1', 'block3/layer_0/bn1', 'bn1']
  if isinstance(model, VGG):
    return [f'block{i}_{3 * (len(widths) - 1) + 1}' for i, widths in enumerate(model.cfg)][1:]
  raise ValueError(
      f'OFD takes its margins from the teacher BatchNorm before each pre-ReLU stage map; '
      f'they are defined for ResNets, WRNs and VGGs, not for {type(model).__name__}. '
      'Choose another teacher or another config.method.')


def _adapter(config, spec, dtype, student, teacher):
  del spec
  base.check_stage_pairs('OFD', config, student, teacher, 'preact')
  return OFDHead(tuple(f.shape[-1] for f in teacher['preact']),
                 kernel_size=config.ofd_connector_kernel, dtype=dtype)


def _terms(ctx: base.LossContext):
  return {'ofd': losses.ofd_loss(ctx.student_out.adapter, ctx.teacher_out.features['preact'],
                                 ctx.constant('margins'), weight=ctx.config.ofd_weight)}, {}


def _check(config):
  if config.teacher:
    ofd_bn_paths(create_model(config.teacher))


def _prepare(config, spec, *, teacher, teacher_variables, train_labels):
  """Returns {'margins': per-stage (C,) margins} from the teacher's BatchNorms."""
  del config, spec, train_labels
  return {'margins': ofd_margins_from_params(teacher_variables['params'],
                                             ofd_bn_paths(teacher))}


base.register_adapter_method('ofd', _adapter, _terms, _check, prepare=_prepare)
