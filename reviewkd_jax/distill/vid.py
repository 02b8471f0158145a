"""'vid': variational information distillation (Ahn et al., CVPR 2019) on the stage maps
(`feat[1:-1]`), as the CRD benchmark runs it: per stage a regressor predicts the teacher's map
and a learned per-channel variance; `losses.vid_loss`, weight `vid_weight` (1),
`vid_init_pred_var` 5.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax import losses
from reviewkd_jax.distill import base
from reviewkd_jax.losses.review import adaptive_avg_pool
from reviewkd_jax.models import layers


class VIDRegressor(nn.Module):
  """RepDistiller's `VIDLoss` parameters: three 1x1 convs and a per-channel variance.

  Input: one student map (N, H, W, Cs) of `feat[1:-1]`; if `target_size` (the teacher's H)
  is smaller than H, it is adaptive-average-pooled to it first. Returns
  `(mu (N, h, w, target_channels), var (target_channels,))` with
  `var = softplus(log_scale) + eps`, initialised to `init_pred_var`; feed them to
  `losses.vid_loss`. `mid_channels` defaults to `target_channels` (the benchmark's
  `VIDLoss(s, t, t)`). Convs have no bias and PyTorch's default init.
  """
  target_channels: int
  mid_channels: int | None = None
  target_size: int | None = None
  init_pred_var: float = 5.0
  eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns `(pred_mean, pred_var)`."""
    if self.target_size is not None and x.shape[1] > self.target_size:
      x = adaptive_avg_pool(x, self.target_size)
    mid = self.mid_channels or self.target_channels
    for i, c in enumerate((mid, mid, self.target_channels)):
      if i:
        x = nn.relu(x)
      x = layers.conv(c, 1, kernel_init=layers.torch_default_kernel_init, dtype=self.dtype,
                      name=f'conv{i}')(x)
    init = math.log(math.expm1(self.init_pred_var - self.eps))
    log_scale = self.param('log_scale', nn.initializers.constant(init),
                           (self.target_channels,), jnp.float32)
    return x, jax.nn.softplus(log_scale) + self.eps


class VIDHead(nn.Module):
  """VID's regressors, one per stage (`feat[1:-1]`); returns ([means], [variances])."""
  teacher_channels: Sequence[int]
  teacher_sizes: Sequence[int]
  init_pred_var: float = 5.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: dict, train: bool) -> tuple[list, list]:
    """Returns the predicted means and variances of the teacher's stage maps."""
    del train
    out = [VIDRegressor(c, target_size=s, init_pred_var=self.init_pred_var,
                        dtype=self.dtype, name=f'regressor_{i}')(f)
           for i, (f, c, s) in enumerate(zip(features['stages'], self.teacher_channels,
                                              self.teacher_sizes))]
    return [mu for mu, _ in out], [var for _, var in out]


def _adapter(config, spec, dtype, student, teacher):
  del spec
  base.check_stage_pairs('VID', config, student, teacher, 'stages')
  return VIDHead(tuple(f.shape[-1] for f in teacher['stages']),
                 tuple(f.shape[1] for f in teacher['stages']),
                 init_pred_var=config.vid_init_pred_var, dtype=dtype)


def _terms(ctx: base.LossContext):
  means, variances = ctx.student_out.adapter
  return {'vid': losses.vid_loss(means, variances, ctx.teacher_out.features['stages'],
                                 weight=ctx.config.vid_weight)}, {}


base.register_adapter_method('vid', _adapter, _terms)
