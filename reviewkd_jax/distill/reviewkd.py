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
from reviewkd_jax.models.layers import nearest_resize

FEATURE_KINDS = ('stages', 'preact')
FUSIONS = ('abf', 'sum', 'none')  # 'none': no residual chain, so nothing is fused
DISTANCES = ('hcl', 'mse')


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


def level_pairs(num_levels: int, *, review: bool = True, residual: bool = True,
                stage_pair: tuple[int, int] | None = None) -> tuple[tuple[int, int], ...]:
  """Returns the 0-based (student level, teacher level) of each output of the ReviewKD adapter.

  The adapter's k-th output is compared with teacher level `pairs[k][1]` (docs/ablations.md):

  - `stage_pair=(i, j)` (1-based stages, the pooled level last): `((i - 1, j - 1),)`, one
    pair through its own transform, L_SKD;
  - `residual`: `((0, 0), ..., (n - 1, n - 1))`, where output j is the chain's fusion of
    student levels j..n-1 (the method; L_MKD-R in residual form);
  - `review` without `residual`: (i, j) for every student level i and teacher level j <= i,
    student level first, each through its own transform: L_MKD-R;
  - neither: (i, i) for every level, each through its own transform: L_MKD.
  """
  if stage_pair is not None:
    return ((stage_pair[0] - 1, stage_pair[1] - 1),)
  if residual or not review:
    return tuple((i, i) for i in range(num_levels))
  return tuple((i, j) for i in range(num_levels) for j in range(i + 1))


def check_switches(*, review: bool, residual: bool, fusion: str,
                   stage_pair: tuple[int, int] | None = None, distance: str = 'hcl') -> None:
  """Raises ValueError, naming the config fields to change, for a combination that is not a
  variant of docs/ablations.md."""
  if fusion not in FUSIONS:
    raise ValueError(f'config.reviewkd_fusion must be one of {FUSIONS}, got {fusion!r}.')
  if distance not in DISTANCES:
    raise ValueError(f'config.reviewkd_distance must be one of {DISTANCES}, got {distance!r}.')
  for name, value in (('review', review), ('residual', residual)):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f'config.reviewkd_{name} must be True or False, got {value!r}.')
  if stage_pair is not None:
    if review or residual or fusion != 'none':
      raise ValueError(
          f'config.reviewkd_student_stage/teacher_stage={tuple(stage_pair)} distil one student '
          'stage from one teacher stage through its own transform (single-layer distillation, '
          "L_SKD): set reviewkd_review=False, reviewkd_residual=False and reviewkd_fusion='none'.")
    return
  if residual and not review:
    raise ValueError(
        'config.reviewkd_residual=True fuses each student level with every deeper one, which is '
        'the review mechanism in residual form: set reviewkd_review=True, or '
        "reviewkd_residual=False with reviewkd_fusion='none' for same-level pairs (L_MKD).")
  if residual and fusion == 'none':
    raise ValueError(
        "config.reviewkd_residual=True fuses the levels of the chain: set reviewkd_fusion='abf' "
        "(attention, the paper's) or 'sum' (plain sum of the resized features).")
  if not residual and fusion != 'none':
    raise ValueError(
        f'config.reviewkd_fusion={fusion!r} fuses the residual chain, which '
        'reviewkd_residual=False removes (every pair has its own transform): set '
        "reviewkd_fusion='none'.")


def config_switches(config: ml_collections.ConfigDict) -> dict:
  """Returns the keyword arguments `review`, `residual`, `fusion`, `stage_pair` of `config`.

  Raises ValueError for stage fields that name no pair: both must be 0 (every level) or both
  >= 1.
  """
  stages = (config.reviewkd_student_stage, config.reviewkd_teacher_stage)
  if stages != (0, 0) and not (isinstance(stages[0], int) and isinstance(stages[1], int)
                               and min(stages) >= 1):
    raise ValueError(
        'config.reviewkd_student_stage and config.reviewkd_teacher_stage are both 0 (every '
        'level) or both >= 1 (one pair: 1-based stages, the pooled level last), got '
        f'{stages}.')
  return dict(review=config.reviewkd_review, residual=config.reviewkd_residual,
              fusion=config.reviewkd_fusion, stage_pair=None if stages == (0, 0) else stages)


class PairTransform(nn.Module):
  """M_s^{i,j} of the variants without the residual chain: student level i -> teacher level j.

  `BN(conv1x1(x))` to the teacher level's channels (no bias, the init of ABF's conv1), then
  the PyTorch-nearest resize to the teacher level's size (as ABF's step 3).
  """
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, out_size: int | Sequence[int], train: bool) -> jax.Array:
    x = layers.conv(self.out_channels, 1, name='conv', dtype=self.dtype,
                    kernel_init=layers.kaiming_uniform_a1)(x)
    x = layers.batch_norm(train, name='bn', dtype=self.dtype)(x)
    return nearest_resize(x, _hw(out_size))


class ReviewKDStudent(nn.Module):
  """A backbone plus its ABF stack; returns `DistillOutput(logits, features, adapter)` with
  `adapter` the fused (ABF output) levels, shallow to deep.

  Attributes:
    student: the backbone (any registered model).
    teacher_channels: channels of each teacher level, shallow to deep, the pooled level last.
    teacher_sizes: spatial size (int or (H, W)) of each teacher level, same order.
    mid_channels: ABF width; None derives the authors' `min(512, C of the deepest student
      level)` (the pooled embedding).
    student_features: 'stages' (after activation: the authors' CIFAR student and ImageNet
      ResNet) or 'preact' (their ImageNet MobileNet); see docs/reviewkd.md.
    review, residual, fusion, stage_pair: the ablation switches (`check_switches`,
      docs/ablations.md); the defaults are the method. Without `residual`, the adapter is
      one `PairTransform` per pair of `level_pairs` (named `pair_s{i}_t{j}`, 1-based
      stages) and `adapter` lists their outputs in that order.
  """
  student: nn.Module
  teacher_channels: Sequence[int]
  teacher_sizes: Sequence[int | Sequence[int]]
  mid_channels: int | None = None
  student_features: str = 'stages'
  dtype: Any = jnp.float32
  review: bool = True
  residual: bool = True
  fusion: str = 'abf'
  stage_pair: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> base.DistillOutput:
    check_switches(review=self.review, residual=self.residual, fusion=self.fusion,
                   stage_pair=self.stage_pair)
    logits, feats = self.student(x, train=train)
    levels = review_features(feats, self.student_features)
    if self.stage_pair is not None:
      i, j = self.stage_pair
      if not (1 <= i <= len(levels) and 1 <= j <= len(self.teacher_channels)):
        raise ValueError(
            f'Stage pair (student {i}, teacher {j}): the student has {len(levels)} review levels '
            f'({len(levels) - 1} {self.student_features} + pooled) and the teacher '
            f'{len(self.teacher_channels)}; stages count from 1, the pooled level last.')
    elif len(levels) != len(self.teacher_channels) or len(levels) != len(self.teacher_sizes):
      raise ValueError(
          f'The student has {len(levels)} review levels ({len(levels) - 1} {self.student_features}'
          f' + pooled) but teacher_channels/teacher_sizes give {len(self.teacher_channels)}/'
          f'{len(self.teacher_sizes)}: pair networks with the same number of stages.')
    if not self.residual:
      transformed = []
      for s, t in level_pairs(len(levels), review=self.review, residual=False,
                              stage_pair=self.stage_pair):
        transform = PairTransform(self.teacher_channels[t], dtype=self.dtype,
                                  name=f'pair_s{s + 1}_t{t + 1}')
        transformed.append(transform(levels[s], out_size=self.teacher_sizes[t], train=train))
      return base.DistillOutput(logits, feats, transformed)
    mid = self.mid_channels or min(512, levels[-1].shape[-1])
    fused = [None] * len(levels)
    residual = None
    # abfs_0 is the deepest level, as in the authors' `self.abfs = abfs[::-1]`.
    for i, level in enumerate(reversed(range(len(levels)))):
      abf = ABF(mid, self.teacher_channels[level], fuse=i > 0, dtype=self.dtype,
                fusion=self.fusion, name=f'abfs_{i}')
      fused[level], residual = abf(levels[level], residual,
                                   out_size=self.teacher_sizes[level], train=train)
    return base.DistillOutput(logits, feats, fused)


def feature_spec(model: nn.Module, input_shape: Sequence[int], kind: str
                 ) -> tuple[list[int], list[tuple[int, int]]]:
  """Returns (channels, (H, W) sizes) of the review levels of `model` (shape inference only)."""
  features = base.feature_shapes(model, input_shape[1:])
  levels = jax.eval_shape(lambda f: review_features(f, kind), features)
  return [int(l.shape[-1]) for l in levels], [(int(l.shape[1]), int(l.shape[2])) for l in levels]


def build_reviewkd(student_name: str, teacher_name: str, *, num_classes: int, image_size: int,
                   mid_channels: int | None = None, student_features: str = 'stages',
                   teacher_features: str = 'preact', dtype: Any = jnp.float32,
                   **switches) -> tuple[ReviewKDStudent, nn.Module]:
  """Returns (ReviewKD student, teacher) modules, the ABFs sized from the teacher's features.

  `switches`: `review`, `residual`, `fusion`, `stage_pair` of `ReviewKDStudent` (the
  ablations; the defaults are the method).
  """
  teacher = create_model(teacher_name, num_classes=num_classes, dtype=dtype)
  channels, sizes = feature_spec(teacher, (1, image_size, image_size, 3), teacher_features)
  student = ReviewKDStudent(
      student=create_model(student_name, num_classes=num_classes, dtype=dtype),
      teacher_channels=tuple(channels), teacher_sizes=tuple(sizes), mid_channels=mid_channels,
      student_features=student_features, dtype=dtype, **switches)
  return student, teacher


# --- The training method ---------------------------------------------------------------------

def _build(config, spec, dtype):
  return build_reviewkd(
      config.model, config.teacher, num_classes=spec.num_classes, image_size=spec.image_size,
      mid_channels=config.mid_channels or None, student_features=config.student_features,
      teacher_features=config.teacher_features, dtype=dtype, **config_switches(config))


_DISTANCES = {'hcl': losses.hcl, 'mse': losses.feature_mse}


def _terms(ctx: base.LossContext) -> tuple[dict, dict]:
  """Returns lambda * warm-up * D(adapter, teacher levels), D = HCL (the method) or MSE, under
  the distance's name."""
  config = ctx.config
  teacher_levels = review_features(ctx.teacher_out.features, config.teacher_features)
  switches = config_switches(config)
  pairs = level_pairs(len(teacher_levels), review=switches['review'],
                      residual=switches['residual'], stage_pair=switches['stage_pair'])
  targets = [teacher_levels[t] for _, t in pairs]
  name = config.reviewkd_distance
  distance = _DISTANCES[name](ctx.student_out.adapter, targets)
  lam = config.reviewkd_weight * base.warmup_factor(ctx.epoch, config.reviewkd_warmup_epochs)
  return {name: lam * distance}, {name: distance, 'lambda': lam}


def _check(config):
  for field in ('student_features', 'teacher_features'):
    if config[field] not in FEATURE_KINDS:
      raise ValueError(f'config.{field} must be one of {FEATURE_KINDS}, got '
                       f'{config[field]!r}.')
  check_switches(**config_switches(config), distance=config.reviewkd_distance)
  if config.mid_channels and not config.reviewkd_residual:
    raise ValueError(
        f'config.mid_channels={config.mid_channels} sets the width of the ABFs of the residual '
        'chain, which reviewkd_residual=False removes: set mid_channels=0.')


# The ablation switches make different experiments; a checkpoint written before they
# existed was of the method itself.
RUN_FIELDS = {'reviewkd_review': True, 'reviewkd_residual': True, 'reviewkd_fusion': 'abf',
              'reviewkd_distance': 'hcl', 'reviewkd_student_stage': 0,
              'reviewkd_teacher_stage': 0}

base.register_method(base.Method(
    name='reviewkd', uses_teacher=True, build=_build, loss_terms=base.with_logit_kd(_terms),
    backbone=lambda module: module.student, backbone_variables=base.student_variables,
    check_config=_check, run_fields=RUN_FIELDS))
