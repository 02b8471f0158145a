"""OFD's connector and its margins from the teacher's BatchNorm statistics."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reviewkd_jax.models import layers


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
