"""'fitnet': FitNets (Romero et al., ICLR 2015) as the CRD benchmark runs it: a trained
regressor maps the student's hint feature `feat[fitnet_hint_layer]` (2: the second stage's
output, on `feat = [stem, *stages, pooled]`) to the teacher's, in one stage together with CE
(RepDistiller's `hint`); `losses.fitnet_loss`, weight `fitnet_weight` (100).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax import losses
from reviewkd_jax.distill import base
from reviewkd_jax.models import layers

# torch.nn.ConvTranspose2d stores (in, out, k, k) and takes fan_in from dim 1 (= out * k * k),
# which is Flax's 'fan_out' for a (k, k, in, out) kernel.
_torch_conv_transpose_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_out', 'uniform')


class FitNetRegressor(nn.Module):
  """RepDistiller's `ConvReg`: conv (with bias) + BN + ReLU to the teacher's shape.

  Input: the student's hint feature (N, Hs, Ws, Cs) (`feat[hint_layer]`, `hint_layer=2`).
  Output: (N, Ht, Wt, teacher_channels). Hs == 2 Ht: 3x3 conv stride 2; 2 Hs == Ht: 4x4
  transposed conv stride 2; Hs >= Ht: a valid conv of kernel 1 + Hs - Ht. PyTorch's default
  initialisers throughout.
  """
  teacher_channels: int
  teacher_size: int
  use_relu: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns the regressed feature, shaped like the teacher's hint feature."""
    (hs, ws, cs), ht = x.shape[1:], self.teacher_size
    if hs == 2 * ht:
      y = layers.conv(self.teacher_channels, 3, stride=2, padding=1, use_bias=True,
                      in_features=cs, kernel_init=layers.torch_default_kernel_init,
                      dtype=self.dtype, name='conv')(x)
    elif 2 * hs == ht:
      # PyTorch's padding p of a transposed conv is k - 1 - p of lax's.
      y = nn.ConvTranspose(self.teacher_channels, (4, 4), strides=(2, 2),
                           padding=((2, 2), (2, 2)),
                           kernel_init=_torch_conv_transpose_kernel_init,
                           bias_init=layers.torch_default_bias_init(self.teacher_channels * 16),
                           dtype=self.dtype, name='conv')(x)
    elif hs >= ht:
      k = (1 + hs - ht, 1 + ws - ht)
      y = nn.Conv(self.teacher_channels, k, padding='VALID',
                  kernel_init=layers.torch_default_kernel_init,
                  bias_init=layers.torch_default_bias_init(cs * k[0] * k[1]),
                  dtype=self.dtype, name='conv')(x)
    else:
      raise ValueError(f'FitNetRegressor: student size {hs} cannot be regressed to teacher '
                       f'size {ht}')
    y = layers.batch_norm(train, name='bn', dtype=self.dtype)(y)
    return nn.relu(y) if self.use_relu else y


class FitNetHead(nn.Module):
  """FitNet's regressor applied to the student's hint feature `feat[hint_layer]`."""
  hint_layer: int
  teacher_channels: int
  teacher_size: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: dict, train: bool) -> jax.Array:
    """Returns the regressed hint, shaped like the teacher's."""
    hint = base.benchmark_features(features)[self.hint_layer]
    return FitNetRegressor(self.teacher_channels, self.teacher_size, dtype=self.dtype,
                           name='regressor')(hint, train)


def _adapter(config, spec, dtype, student, teacher):
  del spec
  num_maps = len(student['stages']) + 1
  if not 0 <= config.fitnet_hint_layer < num_maps:
    raise ValueError(f'config.fitnet_hint_layer={config.fitnet_hint_layer} must index a map '
                     f'of [stem, *stages]: 0..{num_maps - 1} for {config.model}.')
  hint = base.benchmark_features(teacher)[config.fitnet_hint_layer]
  return FitNetHead(config.fitnet_hint_layer, hint.shape[-1], hint.shape[1], dtype=dtype)


def _terms(ctx: base.LossContext):
  c = ctx.config
  target = base.benchmark_features(ctx.teacher_out.features)[c.fitnet_hint_layer]
  return {'fitnet': losses.fitnet_loss(ctx.student_out.adapter, target,
                                       weight=c.fitnet_weight)}, {}


base.register_adapter_method('fitnet', _adapter, _terms)
