"""Layers with PyTorch's padding, BatchNorm settings and initialisers, shared by every family.

Padding is always explicit and symmetric (PyTorch's), never 'SAME': for stride 2 on even
inputs XLA's 'SAME' pads (0, 1) where PyTorch pads (1, 1), which changes every output.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): the init of torchvision and CRD convs.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# kaiming_normal_(mode='fan_in') (CRD's ShuffleNet/MobileNetV2 and others use fan_out too).
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# PyTorch's default Conv2d/Linear weight init: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# kaiming_uniform_(a=1): U(+-sqrt(3/fan_in)), variance 1/fan_in (ABF's convs).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
  """Returns PyTorch's default bias initialiser U(+-1/sqrt(fan_in)) for a layer of `fan_in`."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None,
         groups: int = 1, use_bias: bool = False, name: str, dtype: Dtype = jnp.float32,
         kernel_init=kaiming_normal_fan_out, in_features: int | None = None) -> nn.Conv:
  """Returns an `nn.Conv` that behaves like `torch.nn.Conv2d` (symmetric explicit padding).

  `padding` defaults to kernel // 2. If `use_bias` and `in_features` is given, the bias uses
  PyTorch's default U(+-1/sqrt(fan_in)) init; otherwise zeros.
  """
  pad = kernel // 2 if padding is None else padding
  bias_init = nn.initializers.zeros
  if use_bias and in_features is not None:
    bias_init = torch_default_bias_init(in_features // groups * kernel * kernel)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                 dtype=dtype, name=name)


class BatchNorm(nn.Module):
  """`torch.nn.BatchNorm2d` in NHWC: same outputs and the same running-statistics update.

  Flax's `nn.BatchNorm` updates `var` with the biased batch variance; PyTorch uses the
  unbiased one (n / (n - 1)), which matters for small maps (the 1x1 pooled ABF level). The
  variables keep Flax's names (params `scale`, `bias`; batch_stats `mean`, `var`). Statistics
  are reduced in float32 over every axis but the last; under `jit` with a batch sharded over
  devices, that reduction is global, i.e. synchronised BatchNorm.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', self.bias_init, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      # Two passes, as PyTorch: E[x^2] - E[x]^2 cancels catastrophically in float32 where
      # |mean| >> std (post-ReLU maps, the 1x1 level with a small batch), and the error
      # grows through training steps (tests/test_imagenet_reviewkd.py).
      var = jnp.mean(jnp.square(xf - jnp.expand_dims(mean, axes)), axes)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)).astype(
        self.dtype)


def batch_norm(train: bool, *, name: str, dtype: Dtype = jnp.float32,
               scale_init=nn.initializers.ones) -> BatchNorm:
  """Returns a PyTorch-exact BatchNorm (momentum 0.1 == Flax 0.9, eps 1e-5)."""
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                   scale_init=scale_init, name=name)


def linear(features: int, in_features: int, *, name: str, dtype: Dtype = jnp.float32,
           kernel_init=torch_default_kernel_init, bias_init=None) -> nn.Dense:
  """Returns an `nn.Dense` initialised like `torch.nn.Linear(in_features, features)`."""
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init,
                  bias_init=bias_init or torch_default_bias_init(in_features), name=name)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """Returns `torch.nn.MaxPool2d(kernel, stride, padding)` of NHWC `x` (pads with -inf)."""
  return nn.max_pool(x, (kernel, kernel), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def avg_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """Returns `torch.nn.AvgPool2d(kernel, stride, padding)` (count_include_pad=True)."""
  return nn.avg_pool(x, (kernel, kernel), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)), count_include_pad=True)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Returns the (N, C) spatial mean of NHWC `x`, computed in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def block_output(x: jax.Array) -> jax.Array:
  """Returns `x`, marked as a residual block's output for XLA:CPU's fusion pass.

  Used by the CIFAR ResNets' blocks (`cifar_resnet.ResidualBlock.fusion_barrier`). On the
  CPU backend this is `jax.lax.optimization_barrier(x)`: in a program compiled with
  XLA's `cse_barrier_expander` pass disabled (the classification train step on CPU, see
  `reviewkd_jax.platform.CPU_STEP_OPTIONS`), it stops the fusion pass from re-computing the
  chain of BatchNorm/add/ReLU producers of every block inside the transposing copies that
  feed the weight-gradient convolutions. Elsewhere XLA deletes the barrier before
  optimising, and on GPU/TPU nothing is added: the value and its gradient never change.
  """
  if jax.default_backend() == 'cpu':
    return jax.lax.optimization_barrier(x)
  return x


def _torch_nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """Returns source indices of PyTorch's `interpolate(mode='nearest')` along one axis."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Returns NHWC `x` resized to `size` exactly like PyTorch's nearest interpolation.

  (`jax.image.resize(..., 'nearest')` uses half-pixel centres, which picks other pixels
  when shrinking and for non-integer ratios.) Integer up-sampling is a broadcast (its
  gradient a sum) and integer down-sampling a strided slice; other ratios gather.
  """
  h, w = size
  if (x.shape[1], x.shape[2]) == (h, w):
    return x
  return _nearest_axis(_nearest_axis(x, 1, h), 2, w)


def _nearest_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """Returns `x` resized along `axis` to `out_size` with PyTorch's nearest source indices."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  index = _torch_nearest_index(in_size, out_size)
  if out_size % in_size == 0 and np.array_equal(
      index, np.arange(out_size) // (out_size // in_size)):
    repeats = out_size // in_size  # each source element `repeats` times in a row
    x = jnp.expand_dims(x, axis + 1)
    x = jnp.broadcast_to(x, (*x.shape[:axis + 1], repeats, *x.shape[axis + 2:]))
    return x.reshape(*x.shape[:axis], out_size, *x.shape[axis + 2:])
  if in_size % out_size == 0 and np.array_equal(
      index, np.arange(out_size) * (in_size // out_size)):
    return jax.lax.slice_in_dim(x, 0, in_size, in_size // out_size, axis=axis)
  return jnp.take(x, jnp.asarray(index), axis=axis)


class ModelOutput(NamedTuple):
  """What every backbone returns: `logits` (N, classes) and `features` (see `models`)."""
  logits: jax.Array
  features: dict


def model_output(logits, stem, stages, preact, pooled) -> ModelOutput:
  """Returns a backbone's `ModelOutput` with its features dict (see `reviewkd_jax.models`)."""
  return ModelOutput(logits, {'stem': stem, 'stages': list(stages), 'preact': list(preact),
                              'pooled': pooled})
