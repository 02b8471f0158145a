"""HCL, the hierarchical context loss of ReviewKD, with PyTorch's adaptive pooling bins, and
the plain per-level MSE that ReviewKD's ablations use in its place."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Pyramid levels and weights of the authors' `hcl`: level l gets weight 0.5 ** (k + 1).
HCL_LEVELS = (4, 2, 1)


@functools.cache
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Returns the (out_size, in_size) averaging matrix of PyTorch's `adaptive_avg_pool`.

  Bin i averages `[floor(i * in / out), ceil((i + 1) * in / out))`; for in=7 or 14 with 4
  bins the bins are uneven and overlap, which is why this is not a reshape-and-mean.
  """
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = math.ceil((i + 1) * in_size / out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """Returns PyTorch's `adaptive_avg_pool2d(x, size)` for NHWC `x`, as (N, size, size, C).

  Sizes that divide the map evenly average equal blocks (a reshape and a mean); others use
  PyTorch's uneven, overlapping bins as averaging matrices.
  """
  oh, ow = (size, size) if isinstance(size, int) else size
  n, h, w, c = x.shape
  if h % oh == 0 and w % ow == 0:
    return jnp.mean(x.reshape(n, oh, h // oh, ow, w // ow, c), axis=(2, 4))
  ph = jnp.asarray(adaptive_pool_matrix(h, oh))
  pw = jnp.asarray(adaptive_pool_matrix(w, ow))
  return jnp.einsum('ih,jw,nhwc->nijc', ph, pw, x, precision=jax.lax.Precision.HIGHEST)


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(a - b))


def hcl_level(fs: jax.Array, ft: jax.Array) -> jax.Array:
  """Returns the HCL of one level: MSE plus pyramid MSEs, normalised by the weight total."""
  if fs.shape != ft.shape:
    raise ValueError(f'HCL needs equal shapes per level, got student {fs.shape} and teacher '
                     f'{ft.shape}')
  fs = fs.astype(jnp.float32)
  ft = ft.astype(jnp.float32)
  h = fs.shape[1]
  loss = _mse(fs, ft)
  weight, total = 1.0, 1.0
  for l in HCL_LEVELS:
    if l >= h:  # the authors skip levels at least as large as the map (1x1 maps: plain MSE)
      continue
    weight /= 2.0
    loss = loss + weight * _mse(adaptive_avg_pool(fs, l), adaptive_avg_pool(ft, l))
    total += weight
  return loss / total


def hcl(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array]
        ) -> jax.Array:
  """Returns the hierarchical context loss summed over levels (a float32 scalar).

  Args:
    student_features: NHWC arrays (the ABF outputs), one per level, any order.
    teacher_features: NHWC arrays of the same shapes, in the same order.
  """
  if len(student_features) != len(teacher_features):
    raise ValueError(f'HCL got {len(student_features)} student levels and '
                     f'{len(teacher_features)} teacher levels')
  return sum((hcl_level(fs, ft) for fs, ft in zip(student_features, teacher_features)),
             jnp.zeros((), jnp.float32))


def feature_mse(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array]
                ) -> jax.Array:
  """Returns sum over levels of mean((fs - ft)^2), a float32 scalar: HCL without its pyramid.

  The distance of ReviewKD's ablations without HCL (Chen et al., CVPR 2021, Table 7); on a
  1x1 level it equals `hcl_level`.

  Args:
    student_features: NHWC arrays, one per level (or per distilled pair), any order.
    teacher_features: NHWC arrays of the same shapes, in the same order.
  """
  if len(student_features) != len(teacher_features):
    raise ValueError(f'feature_mse got {len(student_features)} student levels and '
                     f'{len(teacher_features)} teacher levels')
  total = jnp.zeros((), jnp.float32)
  for fs, ft in zip(student_features, teacher_features):
    if fs.shape != ft.shape:
      raise ValueError(f'feature_mse needs equal shapes per level, got student {fs.shape} and '
                       f'teacher {ft.shape}')
    total = total + _mse(fs.astype(jnp.float32), ft.astype(jnp.float32))
  return total
