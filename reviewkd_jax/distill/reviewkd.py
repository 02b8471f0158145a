"""ReviewKD (Chen et al., CVPR 2021): the ABF fusion stack, the student that carries it, and
the training method 'reviewkd' (CE + lambda * warm-up * HCL).

The student's features, deepest first, pass through one ABF each. Every ABF but the deepest
fuses its own (transformed) student feature with the residual coming from the next deeper
level, so each teacher feature is supervised by the student's features at its level and all
deeper ones (the "review"). All channel counts and sizes are read from the two networks'
feature shapes; `mid_channels` is the only knob that the paper sets by hand (ImageNet).
The loss is the pure function `losses.hcl`; docs/reviewkd.md describes every piece and the
feature kinds each paper config distils.

The paper's ablations switch the pieces off (docs/ablations.md has each variant's loss):
`review` (teacher level j supervised by student levels i >= j, or by level j only),
`residual` (the fused deepest-first chain of ABFs, or one independent `PairTransform` per
(student level, teacher level) pair), `fusion` ('abf' attention or a plain 'sum'), the
distance (`losses.hcl` or `losses.feature_mse`) and `stage_pair` (one student stage
distilled from one teacher stage). The defaults build and compute exactly the method above.
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reviewkd_jax import losses
from reviewkd_jax.distill import base
from reviewkd_jax.models import create_model
from reviewkd_jax.models import layers

FEATURE_KINDS = ('stages', 'preact')
FUSIONS = ('abf', 'sum', 'none')  # 'none': no residual chain, so nothing is fused
DISTANCES = ('hcl', 'mse')


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
  when shrinking and for non-integer ratios.)
  """
  h, w = size
  if (x.shape[1], x.shape[2]) == (h, w):
    return x
  x = jnp.take(x, jnp.asarray(_torch_nearest_index(x.shape[1], h)), axis=1)
  return jnp.take(x, jnp.asarray(_torch_nearest_index(x.shape[2], w)), axis=2)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


class ABF(nn.Module):
  """Attention-based fusion for one level; returns (output for HCL, residual for next level).

  Submodule names follow the authors' PyTorch ABF (`conv1.0/1`, `att_conv.0`, `conv2.0/1`)
  so their checkpoints load with the generic converter. `fusion='sum'` (an ablation) fuses
  by the plain sum `x + resize(residual)` and has no `att_conv_0`.
  """
  mid_channels: int
  out_channels: int
  fuse: bool
  dtype: Any = jnp.float32
  fusion: str = 'abf'  # 'abf' (attention) | 'sum'

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None, *,
               out_size: int | Sequence[int], train: bool) -> tuple[jax.Array, jax.Array]:
    x = layers.conv(self.mid_channels, 1, name='conv1_0', dtype=self.dtype,
                    kernel_init=layers.kaiming_uniform_a1)(x)
    x = layers.batch_norm(train, name='conv1_1', dtype=self.dtype)(x)
    if self.fuse:
      if residual is None:
        raise ValueError('a fusing ABF needs the residual of the deeper level')
      y = nearest_resize(residual, (x.shape[1], x.shape[2])).astype(x.dtype)
      if self.fusion == 'sum':
        x = x + y
      elif self.fusion == 'abf':
        z = layers.conv(2, 1, use_bias=True, in_features=2 * self.mid_channels,
                        kernel_init=layers.torch_default_kernel_init, name='att_conv_0',
                        dtype=self.dtype)(jnp.concatenate([x, y], axis=-1))
        z = nn.sigmoid(z)
        x = x * z[..., 0:1] + y * z[..., 1:2]
      else:
        raise ValueError(f"ABF fusion must be 'abf' or 'sum', got {self.fusion!r}")
    x = nearest_resize(x, _hw(out_size))
    out = layers.conv(self.out_channels, 3, name='conv2_0', dtype=self.dtype,
                      kernel_init=layers.kaiming_uniform_a1)(x)
    out = layers.batch_norm(train, name='conv2_1', dtype=self.dtype)(out)
    return out, x


def review_features(features: dict, kind: str) -> list[jax.Array]:
  """Returns the level list ReviewKD distils: `features[kind]` then pooled as (N, 1, 1, C)."""
  if kind not in FEATURE_KINDS:
    raise ValueError(f'feature kind must be one of {FEATURE_KINDS}, got {kind!r}')
  pooled = features['pooled']
  return [*features[kind], pooled.reshape(pooled.shape[0], 1, 1, pooled.shape[-1])]


class ReviewKDStudent(nn.Module):
  """A backbone plus its ABF stack; returns `DistillOutput(logits, features, head)` with
  `head` the fused (ABF output) levels, shallow to deep.

  Attributes:
    student: the backbone (any registered model).
    teacher_channels: channels of each teacher level, shallow to deep, the pooled level last.
    teacher_sizes: spatial size (int or (H, W)) of each teacher level, same order.
    mid_channels: ABF width; None derives the authors' `min(512, C of the deepest student
      level)` (the pooled embedding).
    student_features: 'stages' (after activation: the authors' CIFAR student and ImageNet
      ResNet) or 'preact' (their ImageNet MobileNet); see docs/reviewkd.md.
  """
  student: nn.Module
  teacher_channels: Sequence[int]
  teacher_sizes: Sequence[int | Sequence[int]]
  mid_channels: int | None = None
  student_features: str = 'stages'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> base.DistillOutput:
    logits, feats = self.student(x, train=train)
    levels = review_features(feats, self.student_features)
    if len(levels) != len(self.teacher_channels) or len(levels) != len(self.teacher_sizes):
      raise ValueError(
          f'The student has {len(levels)} review levels ({len(levels) - 1} {self.student_features}'
          f' + pooled) but teacher_channels/teacher_sizes give {len(self.teacher_channels)}/'
          f'{len(self.teacher_sizes)}: pair networks with the same number of stages.')
    mid = self.mid_channels or min(512, levels[-1].shape[-1])
    fused = [None] * len(levels)
    residual = None
    # abfs_0 is the deepest level, as in the authors' `self.abfs = abfs[::-1]`.
    for i, level in enumerate(reversed(range(len(levels)))):
      abf = ABF(mid, self.teacher_channels[level], fuse=i > 0, dtype=self.dtype,
                name=f'abfs_{i}')
      fused[level], residual = abf(levels[level], residual,
                                   out_size=self.teacher_sizes[level], train=train)
    return base.DistillOutput(logits, feats, fused)


def feature_spec(model: nn.Module, input_shape: Sequence[int], kind: str
                 ) -> tuple[list[int], list[tuple[int, int]]]:
  """Returns (channels, (H, W) sizes) of the review levels of `model` (shape inference only)."""

  def run():
    x = jnp.zeros(input_shape, jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    return review_features(model.apply(variables, x, train=False).features, kind)

  levels = jax.eval_shape(run)
  return [int(l.shape[-1]) for l in levels], [(int(l.shape[1]), int(l.shape[2])) for l in levels]


def build_reviewkd(student_name: str, teacher_name: str, *, num_classes: int, image_size: int,
                   mid_channels: int | None = None, student_features: str = 'stages',
                   teacher_features: str = 'preact', dtype: Any = jnp.float32
                   ) -> tuple[ReviewKDStudent, nn.Module]:
  """Returns (ReviewKD student, teacher) modules, the ABFs sized from the teacher's features."""
  teacher = create_model(teacher_name, num_classes=num_classes, dtype=dtype)
  channels, sizes = feature_spec(teacher, (1, image_size, image_size, 3), teacher_features)
  student = ReviewKDStudent(
      student=create_model(student_name, num_classes=num_classes, dtype=dtype),
      teacher_channels=tuple(channels), teacher_sizes=tuple(sizes), mid_channels=mid_channels,
      student_features=student_features, dtype=dtype)
  return student, teacher


# --- The training method ---------------------------------------------------------------------

def _build(config, spec, dtype):
  return build_reviewkd(
      config.model, config.teacher, num_classes=spec.num_classes, image_size=spec.image_size,
      mid_channels=config.mid_channels or None, student_features=config.student_features,
      teacher_features=config.teacher_features, dtype=dtype)


def _terms(ctx: base.LossContext) -> tuple[dict, dict]:
  config = ctx.config
  teacher_levels = review_features(ctx.teacher_out.features, config.teacher_features)
  hcl = losses.hcl(ctx.student_out.head, teacher_levels)
  lam = config.reviewkd_weight * base.warmup_factor(ctx.epoch, config.reviewkd_warmup_epochs)
  return {'hcl': lam * hcl}, {'hcl': hcl, 'lambda': lam}


def _check(config):
  for field in ('student_features', 'teacher_features'):
    if config[field] not in FEATURE_KINDS:
      raise ValueError(f'config.{field} must be one of {FEATURE_KINDS}, got '
                       f'{config[field]!r}.')


base.register_method(base.Method(
    name='reviewkd', uses_teacher=True, build=_build, loss_terms=base.with_logit_kd(_terms),
    backbone=lambda module: module.student, backbone_variables=base.student_variables,
    check_config=_check))
