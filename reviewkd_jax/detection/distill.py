"""The detection distillation terms: pure loss functions and the adapters they train.

ReviewKD on the FPN levels (`FPNReview`, five `distill.reviewkd.ABF`s named `abfs_0`..`abfs_4`
deepest first, as the authors' `kd_trans`; `reviewkd_loss`), KD on the RoI classification
logits with the teacher's RoI head run on the student's sampled RoIs (`teacher_roi_logits`,
`roi_kd_loss`), FitNet on res3 (`FitNetAdapter`, `fitnet_loss`) and FGFI's anchor-based
imitation masks per FPN level (`imitation_masks`, `FGFIAdapters`, `fgfi_loss`). Every loss
takes the student side first, stops the gradient where the teacher enters and multiplies by
its `weight`; every shape is static (padded ground truth with `gt_valid`, RoI slots with
`valid`). The methods that use them are `detection/methods/`; their sources and where ours
differ are in docs/detection.md (Distillation).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax import losses
from reviewkd_jax.detection import anchors as anchor_ops
from reviewkd_jax.detection import boxes as box_ops
from reviewkd_jax.detection.model import LEVELS
from reviewkd_jax.detection import roi_heads
from reviewkd_jax.distill.reviewkd import ABF
from reviewkd_jax.models import layers

BOX_LEVELS = LEVELS[:4]           # the RoI heads pool from P2..P5
FITNET_LEVEL = 'c3'               # res3: output of the second residual stage
KD_WEIGHT = 20.0
FITNET_WEIGHT = 0.1
FGFI_WEIGHT = 0.01
FGFI_PSI = 0.5


def pyramid(features: Mapping[str, jax.Array], levels: Sequence[str] = LEVELS
            ) -> list[jax.Array]:
  """Returns `features[level]` for each level, shallowest first (P2..P6 by default)."""
  return [features[name] for name in levels]


# ---------------------------------------------------------------------------- ReviewKD


class FPNReview(nn.Module):
  """ReviewKD's five ABFs over the FPN levels (the authors' `kd_trans`), deepest first.

  `__call__(levels, train=...)` takes the student's levels shallowest first (P2..P6, NHWC)
  and returns the ABF outputs in the same order, each of the shape of its level with
  `out_channels` channels (to be compared with the teacher's level by `reviewkd_loss`).
  Submodule `abfs_k` serves level `len(levels) - 1 - k` (the authors' reversed ModuleList);
  `abfs_0` does not fuse. Needs `mutable=['batch_stats']` when `train=True`.
  """
  mid_channels: int = 256
  out_channels: int = 256
  fusion: str = 'abf'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], *, train: bool) -> list[jax.Array]:
    n = len(levels)
    outputs: list[Any] = [None] * n
    residual = None
    for k, i in enumerate(reversed(range(n))):
      x = levels[i]
      outputs[i], residual = ABF(self.mid_channels, self.out_channels, fuse=k > 0,
                                 dtype=self.dtype, fusion=self.fusion, name=f'abfs_{k}')(
                                     x, residual, out_size=tuple(x.shape[1:3]), train=train)
    return outputs


def reviewkd_loss(outputs: Sequence[jax.Array], teacher_levels: Sequence[jax.Array], *,
                  weight: float = 1.0) -> jax.Array:
  """Returns `weight * hcl(outputs, teacher_levels)` (float32 scalar), teacher side stopped.

  Args:
    outputs: `FPNReview`'s outputs, shallowest first.
    teacher_levels: the teacher's FPN levels in the same order and shapes.
    weight: the pair's ReviewKD lambda (1.2 / 1.0 / 2.0 boxes; 1.5 / 0.8 / 1.0 masks).
  """
  teacher = [jax.lax.stop_gradient(t) for t in teacher_levels]
  return weight * losses.hcl(list(outputs), teacher)


# -------------------------------------------------------------------------------- KD


def _roi_predictions(module: nn.Module, features: Mapping[str, jax.Array], boxes: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  config = module.config.roi
  pooled = roi_heads.pool(config, pyramid(features, BOX_LEVELS), boxes, config.box_pool_size)
  return module.box_predictor(module.box_head(pooled))


def roi_predictions(module: nn.Module, variables: Any, features: Mapping[str, jax.Array],
                    boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns an `RCNN`'s (class logits (B, S, K + 1), box deltas (B, S, 4K)) for given boxes.

  The detector's own box pooler (its `config.roi` rules), box head and box predictor on its
  FPN levels `features` ({'p2', ..., 'p5'} at least), for (B, S, 4) RoIs (e.g.
  `RoISamples.boxes`). mdistiller's `forward_pure_roi_head`. Only `variables['params']`'s
  `box_head` and `box_predictor` are read.
  """
  return module.apply(variables, features, boxes, method=_roi_predictions)


def teacher_roi_logits(teacher_module: nn.Module, teacher_variables: Any,
                       teacher_feats: Mapping[str, jax.Array], roi_boxes: jax.Array
                       ) -> jax.Array:
  """Returns the teacher's (B, S, K + 1) class logits on the student's RoIs, no gradient."""
  sg = jax.lax.stop_gradient
  feats = {name: sg(teacher_feats[name]) for name in BOX_LEVELS}
  logits, _ = roi_predictions(teacher_module, sg(teacher_variables), feats, sg(roi_boxes))
  return sg(logits)


def roi_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, valid: jax.Array, *,
                temperature: float = 1.0, weight: float = KD_WEIGHT) -> jax.Array:
  """Returns KD on the RoI classification logits (float32 scalar).

  `weight * T^2 * mean over valid RoIs of KL(softmax(t / T) || softmax(s / T))`, the KL
  summed over the K + 1 classes; 0 when no RoI is valid.

  Args:
    student_logits: (B, S, K + 1) the student's logits on its sampled RoIs.
    teacher_logits: (B, S, K + 1) the teacher's on the same RoIs (`teacher_roi_logits`).
    valid: (B, S) which slots hold sampled RoIs (`RoISamples.valid`).
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  kl = jnp.where(valid, kl, 0.0)   # where, not *: padded slots may hold non-finite logits
  num = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  return weight * temperature**2 * jnp.sum(kl) / num


# ---------------------------------------------------------------------------- FitNet


class FitNetAdapter(nn.Module):
  """FitNet's regressor for equal strides (RepDistiller's `ConvReg`): 1x1 conv (bias) + BN +
  ReLU to `out_channels` (the teacher's). Submodules `conv`, `bn`; needs
  `mutable=['batch_stats']` when `train=True` and `norm`."""
  out_channels: int
  norm: bool = True
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = layers.conv(self.out_channels, 1, use_bias=True, in_features=x.shape[-1],
                    kernel_init=layers.torch_default_kernel_init, name='conv',
                    dtype=self.dtype)(x)
    if self.norm:
      y = layers.batch_norm(train, name='bn', dtype=self.dtype)(y)
    return nn.relu(y) if self.relu else y


def fitnet_loss(adapted: jax.Array, teacher_feat: jax.Array, *,
                weight: float = FITNET_WEIGHT) -> jax.Array:
  """Returns `weight * mean((adapted - teacher)^2)` (float32 scalar), teacher side stopped."""
  if adapted.shape != teacher_feat.shape:
    raise ValueError(f'fitnet_loss: adapted student {adapted.shape} and teacher '
                     f'{teacher_feat.shape} differ')
  t = jax.lax.stop_gradient(teacher_feat.astype(jnp.float32))
  return weight * jnp.mean(jnp.square(adapted.astype(jnp.float32) - t))


# ------------------------------------------------------------------------------ FGFI


def imitation_masks(anchor_config: anchor_ops.AnchorConfig,
                    level_shapes: Sequence[tuple[int, int]], gt_boxes: jax.Array,
                    gt_valid: jax.Array, *, image_shape: tuple[int, int] | None = None,
                    psi: float = FGFI_PSI, per_level: bool = True) -> list[jax.Array]:
  """Returns FGFI's imitation masks, one (B, H, W) bool array per level.

  A location is masked if one of its anchors has, with some valid ground-truth box, an IoU
  strictly above `psi` times that box's maximum IoU over the level's anchors (over all
  levels' anchors with `per_level=False`).

  Args:
    anchor_config: the detector's anchors (`config.rpn.anchors`).
    level_shapes: (H, W) of each level's feature map, P2 first.
    gt_boxes: (B, G, 4) padded ground truth; `gt_valid` (B, G) marks the real boxes.
    image_shape: the padded image (H, W), needed for torchvision-style grid strides only.
  """
  level_shapes = [tuple(int(v) for v in s) for s in level_shapes]
  anchors = [jnp.asarray(a) for a in anchor_ops.grid_anchors(anchor_config, level_shapes,
                                                             image_shape)]
  num_anchors = anchor_config.num_anchors

  def one(args):
    gt, gv = args
    ious = [box_ops.box_iou(a, gt) for a in anchors]                        # (N_l, G)
    if per_level:
      best = [jnp.max(iou, axis=0) for iou in ious]
    else:
      best = [jnp.max(jnp.stack([jnp.max(iou, axis=0) for iou in ious]), axis=0)] * len(ious)
    masks = []
    for iou, m, (h, w) in zip(ious, best, level_shapes):
      hit = (iou > psi * m[None, :]) & gv[None, :]
      masks.append(jnp.any(hit.reshape(h, w, num_anchors, -1), axis=(2, 3)))
    return masks

  # One image at a time: a level's IoU matrix is (H * W * A, G), 135 MB for P2 of a
  # 1344x1344 image with 100 boxes.
  return jax.lax.map(one, (gt_boxes.astype(jnp.float32), gt_valid.astype(bool)))


def _fgfi_kernel_init(key, shape, dtype=jnp.float32):
  """N(0, 1e-4) folded into (-2e-4, 2e-4): the original's `normal_().fmod_(2).mul_(1e-4)`."""
  return jnp.fmod(jax.random.normal(key, shape, dtype), 2.0) * 1e-4


class FGFIAdapters(nn.Module):
  """FGFI's adaptation layers, one per level (submodules named by level, e.g. `p2`):
  `kernel` x `kernel` conv with bias to `out_channels` [+ ReLU]. `__call__(levels)` maps
  the student's levels (shallowest first) to the adapted ones."""
  out_channels: int = 256
  kernel: int = 3
  relu: bool = False
  names: Sequence[str] = LEVELS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> list[jax.Array]:
    if len(levels) != len(self.names):
      raise ValueError(f'FGFIAdapters: {len(levels)} levels for names {tuple(self.names)}')
    out = []
    for name, x in zip(self.names, levels):
      y = layers.conv(self.out_channels, self.kernel, use_bias=True, in_features=x.shape[-1],
                      kernel_init=_fgfi_kernel_init, name=name, dtype=self.dtype)(x)
      out.append(nn.relu(y) if self.relu else y)
    return out


def fgfi_loss(adapted: Sequence[jax.Array], teacher_levels: Sequence[jax.Array],
              masks: Sequence[jax.Array], *, weight: float = FGFI_WEIGHT) -> jax.Array:
  """Returns FGFI's imitation loss summed over levels (float32 scalar).

  Per level: `sum over images, masked positions and channels of (t - a)^2 / (2 * number of
  masked positions in the batch)`, 0 for an empty mask; teacher side stopped.

  Args:
    adapted: the adapted student levels (`FGFIAdapters`), NHWC.
    teacher_levels: the teacher's levels, same shapes and order.
    masks: (B, H, W) bool per level (`imitation_masks`).
  """
  if not len(adapted) == len(teacher_levels) == len(masks):
    raise ValueError(f'fgfi_loss: {len(adapted)} adapted, {len(teacher_levels)} teacher and '
                     f'{len(masks)} mask levels')
  total = jnp.zeros((), jnp.float32)
  for a, t, m in zip(adapted, teacher_levels, masks):
    if a.shape != t.shape or m.shape != a.shape[:3]:
      raise ValueError(f'fgfi_loss: shapes {a.shape}, {t.shape}, mask {m.shape} do not match')
    t = jax.lax.stop_gradient(t.astype(jnp.float32))
    sq = jnp.sum(jnp.square(t - a.astype(jnp.float32)), axis=-1)
    count = jnp.sum(m).astype(jnp.float32)
    total = total + jnp.sum(jnp.where(m, sq, 0.0)) / (2.0 * jnp.maximum(count, 1.0))
  return weight * total


__all__ = [
    'BOX_LEVELS', 'FGFI_PSI', 'FGFI_WEIGHT', 'FITNET_LEVEL', 'FITNET_WEIGHT', 'KD_WEIGHT',
    'LEVELS', 'FGFIAdapters', 'FPNReview', 'FitNetAdapter', 'fgfi_loss', 'fitnet_loss',
    'imitation_masks', 'pyramid', 'reviewkd_loss', 'roi_kd_loss', 'roi_predictions',
    'teacher_roi_logits'
]
