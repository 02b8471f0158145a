"""The RoI heads of Faster/Mask R-CNN with FPN: box and mask heads, their losses, inference.

The pinned modules `BoxHead` (fc1, fc2), `BoxPredictor` (cls_score with the background
LAST, class-specific bbox_pred) and `MaskHead` (fcn1..fcn4, deconv, predictor), initialised as
Detectron2's; `roi_losses` (ground truth appended to the proposals, matching, 512 sampled
RoIs per image, classification, box and mask losses; `mask_targets`); `detect` (per-class
NMS, the top 100) and the mask pasting (`mask_probabilities`, `paste_masks`, Detectron2's or
torchvision's rule). Shapes are static: fixed RoI slots with a `valid` mask, foreground
first, the mask head on the first 128 slots. RoI features are NHWC, flattened H, W, C.
docs/detection.md (Module notes: roi_heads.py) lists each rule, its source and where we
differ.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.detection import boxes as box_ops
from reviewkd_jax.detection import roi_align as roi_ops
from reviewkd_jax.detection import sampling
from reviewkd_jax.models import layers

Dtype = Any
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MASK_TARGET_RULES = ('detectron2', 'torchvision')
PASTE_RULES = ('detectron2', 'torchvision')

# Detectron2's c2_msra_fill on a PyTorch ConvTranspose2d weight (in, out, kh, kw) takes
# fan_out = in * kh * kw; our kernel is (kh, kw, in, out).
_deconv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=-1,
                                                out_axis=-2)


# ----------------------------------------------------------------------------- modules


class Deconv2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID')`, as a matmul.

  out[2i + a, 2j + b] = x[i, j] @ kernel[1 - a, 1 - b] + bias: the taps do not overlap, so
  the transposed convolution is a (C, 4 * features) matmul followed by depth-to-space.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param('kernel', _deconv_init, (2, 2, cin, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    n, h, w, _ = x.shape
    flipped = kernel[::-1, ::-1].astype(self.dtype)                      # (a, b, c, o)
    y = jnp.einsum('nhwc,abco->nhawbo', x.astype(self.dtype), flipped)
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)



class BoxHead(nn.Module):
  """Two fully connected layers on (..., P, P, C) RoI features -> (..., hidden)."""
  hidden: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(*x.shape[:-3], -1).astype(self.dtype)
    for name in ('fc1', 'fc2'):
      x = nn.relu(nn.Dense(self.hidden, kernel_init=layers.kaiming_uniform_a1,
                           bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)(x))
    return x


class BoxPredictor(nn.Module):
  """Returns (class logits (..., K + 1), background last; box deltas (..., 4K))."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros, dtype=self.dtype, name='cls_score')(x)
    deltas = nn.Dense(4 * self.num_classes, kernel_init=nn.initializers.normal(0.001),
                      bias_init=nn.initializers.zeros, dtype=self.dtype, name='bbox_pred')(x)
    return logits, deltas


class MaskHead(nn.Module):
  """(..., 14, 14, C) RoI features -> (..., 28, 28, K) mask logits (Mask R-CNN's FCN head)."""
  num_classes: int
  conv_dims: int = 256
  num_convs: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).astype(self.dtype)
    for i in range(self.num_convs):
      x = nn.relu(layers.conv(self.conv_dims, 3, use_bias=True, name=f'fcn{i + 1}',
                              dtype=self.dtype)(x))
    x = nn.relu(Deconv2x2(self.conv_dims, dtype=self.dtype, name='deconv')(x))
    x = nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.001),
                bias_init=nn.initializers.zeros, dtype=self.dtype, name='predictor')(x)
    return x.reshape(*lead, *x.shape[1:])


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class RoIHeadsConfig:
  """Options of the RoI heads; the defaults are Detectron2's, `torchvision()` gives its own.

  sampling_ratio: samples per bin side, a fixed int (2), or 0 for Detectron2's adaptive
  count ceil(roi side / bins) capped at `max_sampling_ratio` (see `roi_align`'s docstring).
  """
  num_classes: int
  box_pool_size: int = 7
  mask_pool_size: int = 14
  sampling_ratio: int = 2
  max_sampling_ratio: int = 4
  aligned: bool = True                    # torchvision: False
  level_rule: str = 'detectron2'          # or 'torchvision'
  min_level: int = 2
  canonical_box_size: float = 224.0
  canonical_level: int = 4
  batch_size_per_image: int = 512
  positive_fraction: float = 0.25
  iou_threshold: float = 0.5
  box_weights: tuple[float, float, float, float] = BOX_WEIGHTS
  smooth_l1_beta: float = 0.0             # torchvision: 1/9
  mask_target_rule: str = 'detectron2'    # or 'torchvision'
  score_threshold: float = 0.05
  nms_threshold: float = 0.5
  max_detections: int = 100
  min_box_size: float = 0.0               # torchvision: 1e-2
  max_candidates: int = 2048
  paste_rule: str = 'detectron2'          # or 'torchvision'; for the caller's `paste_masks`

  @classmethod
  def torchvision(cls, num_classes: int, **overrides) -> 'RoIHeadsConfig':
    """Returns torchvision's choices (`roi_heads.RoIHeads` of `maskrcnn_resnet50_fpn`)."""
    tv = dict(aligned=False, level_rule='torchvision', smooth_l1_beta=1.0 / 9,
              mask_target_rule='torchvision', min_box_size=1e-2, paste_rule='torchvision')
    tv.update(overrides)
    return cls(num_classes=num_classes, **tv)

  @property
  def num_mask_slots(self) -> int:
    """Slots of `RoISamples` that can be foreground (the first ones)."""
    return int(self.batch_size_per_image * self.positive_fraction)


def pool(config: RoIHeadsConfig, features: Sequence[jax.Array], boxes: jax.Array,
         output_size: int) -> jax.Array:
  """Returns (B, R, P, P, C) RoIAlign features of (B, R, 4) boxes from the FPN levels.

  Mapped over the images (`vmap`), each image's boxes reading its own pyramid: the gathers
  keep the batch axis, so a batch split over devices pools on each device from its own
  images (one flat buffer of all images' levels made XLA's partitioner copy every image's
  pyramid to every device).
  """
  r = boxes.shape[1]

  def one(levels, image_boxes):
    return roi_ops.multiscale_roi_align(
        [f[None] for f in levels], image_boxes, jnp.zeros((r,), jnp.int32), output_size,
        min_level=config.min_level, sampling_ratio=config.sampling_ratio,
        max_sampling_ratio=config.max_sampling_ratio, aligned=config.aligned,
        level_rule=config.level_rule, canonical_box_size=config.canonical_box_size,
        canonical_level=config.canonical_level)

  return jax.vmap(one)(list(features), boxes)


# ---------------------------------------------------------------------------- training


class RoISamples(NamedTuple):
  """The sampled RoIs of a batch, (B, S) slots per image, foreground slots first.

  boxes: (B, S, 4) proposal (or ground-truth) boxes.
  valid: (B, S) the slot holds a sampled RoI.
  foreground: (B, S) a sampled foreground RoI.
  classes: (B, S) int32 class of the matched ground truth (0..K-1) for foreground, K
    (background) otherwise.
  matched: (B, S) int32 index of the matched ground truth (0 where not foreground).
  targets: (B, S, 4) regression targets of foreground slots, 0 elsewhere.
  """
  boxes: jax.Array
  valid: jax.Array
  foreground: jax.Array
  classes: jax.Array
  matched: jax.Array
  targets: jax.Array


def _candidates(proposals, proposal_valid, gt_boxes, gt_valid):
  """Returns the (B, P + G) candidates: proposals followed by the ground truth (both libraries)."""
  return (jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)], axis=1),
          jnp.concatenate([proposal_valid, gt_valid], axis=1))


def candidate_labels(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                     gt_valid: jax.Array, iou_threshold: float = 0.5):
  """Returns (candidates (B, N, 4), matched (B, N), labels (B, N) in {1, 0, -1}).

  N = P + G: the proposals with the ground truth appended. Label -1 marks invalid
  candidates (padding), which are never sampled.
  """
  cands, valid = _candidates(proposals, proposal_valid, gt_boxes, gt_valid)

  def one(c, v, g, gv):
    matched, labels = sampling.match(box_ops.box_iou(g, c), gv, iou_threshold, iou_threshold,
                                     False)
    return matched, jnp.where(v, labels, -1)

  matched, labels = jax.vmap(one)(cands, valid, gt_boxes.astype(cands.dtype), gt_valid)
  return cands, matched, labels


def sample_rois(key: jax.Array | None, proposals: jax.Array, proposal_valid: jax.Array,
                gt_boxes: jax.Array, gt_classes: jax.Array, gt_valid: jax.Array, *,
                num_classes: int, batch_size_per_image: int = 512,
                positive_fraction: float = 0.25, iou_threshold: float = 0.5,
                box_weights: Sequence[float] = BOX_WEIGHTS,
                sample_masks: tuple[jax.Array, jax.Array] | None = None) -> RoISamples:
  """Appends the ground truth to the proposals, matches, samples; returns `RoISamples`.

  Args:
    key: jax.random key of the draw (one per step; split per image here). Unused when
      `sample_masks` is given.
    proposals: (B, P, 4) proposal boxes (treated as constants), `proposal_valid` (B, P).
    gt_boxes: (B, G, 4) padded ground truth, `gt_classes` (B, G) in 0..K-1, `gt_valid` (B, G).
    num_classes: K (the background class index).
    sample_masks: optional (positive, negative) boolean masks (B, P + G) over the candidates
      (proposals, then ground truth) instead of a random draw; at most
      int(batch_size_per_image * positive_fraction) positives and batch_size_per_image in all.
  """
  proposals = jax.lax.stop_gradient(proposals)
  b = proposals.shape[0]
  cands, matched, labels = candidate_labels(proposals, proposal_valid, gt_boxes, gt_valid,
                                            iou_threshold)
  n = cands.shape[1]
  s = batch_size_per_image
  if sample_masks is None:
    keys = jax.random.split(key, b)
    pos, neg = jax.vmap(lambda k, lab: sampling.sample(k, lab, s, positive_fraction))(
        keys, labels)
  else:
    pos, neg = (jnp.asarray(m, bool) for m in sample_masks)
  if n < s:  # pad so that there are S slots to fill
    pad = s - n
    cands = jnp.pad(cands, ((0, 0), (0, pad), (0, 0)))
    matched = jnp.pad(matched, ((0, 0), (0, pad)))
    pos = jnp.pad(pos, ((0, 0), (0, pad)))
    neg = jnp.pad(neg, ((0, 0), (0, pad)))
  rank = jnp.where(pos, 0, jnp.where(neg, 1, 2))
  order = jnp.argsort(rank, axis=1, stable=True)[:, :s]
  take = functools.partial(jnp.take_along_axis, indices=order, axis=1)
  boxes = jnp.take_along_axis(cands, order[..., None], axis=1)
  foreground = take(pos)
  valid = foreground | take(neg)
  matched = jnp.where(foreground, take(matched), 0)
  classes = jnp.where(foreground, jnp.take_along_axis(gt_classes, matched, axis=1),
                      num_classes).astype(jnp.int32)
  gt = jnp.take_along_axis(gt_boxes.astype(boxes.dtype), matched[..., None], axis=1)
  unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], boxes.dtype)
  safe_ref = jnp.where(foreground[..., None], boxes, unit)
  safe_gt = jnp.where(foreground[..., None], gt, unit)
  targets = jnp.where(foreground[..., None], box_ops.encode(safe_ref, safe_gt, box_weights), 0.0)
  return RoISamples(boxes, valid, foreground, classes, matched.astype(jnp.int32), targets)


def box_losses(class_logits: jax.Array, box_deltas: jax.Array, samples: RoISamples, *,
               smooth_l1_beta: float = 0.0) -> dict[str, jax.Array]:
  """Returns {'loss_cls', 'loss_box_reg'} of (B, S, K + 1) logits and (B, S, 4K) deltas.

  Cross-entropy mean over the valid slots; box loss summed over the foreground slots (the
  ground-truth class's deltas) and divided by the number of valid slots, L1 for
  `smooth_l1_beta=0` (Detectron2), smooth L1 otherwise (torchvision: 1/9).
  """
  num = jnp.maximum(jnp.sum(samples.valid), 1).astype(jnp.float32)
  logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, samples.classes[..., None], axis=-1)[..., 0]
  loss_cls = jnp.sum(jnp.where(samples.valid, ce, 0.0)) / num
  k = box_deltas.shape[-1] // 4
  deltas = box_deltas.astype(jnp.float32).reshape(*box_deltas.shape[:-1], k, 4)
  cls = jnp.clip(samples.classes, 0, k - 1)
  pred = jnp.take_along_axis(deltas, cls[..., None, None], axis=-2)[..., 0, :]
  diff = jnp.abs(pred - samples.targets)
  if smooth_l1_beta > 0:
    diff = jnp.where(diff < smooth_l1_beta, 0.5 * diff * diff / smooth_l1_beta,
                     diff - 0.5 * smooth_l1_beta)
  loss_box = jnp.sum(jnp.where(samples.foreground[..., None], diff, 0.0)) / num
  return {'loss_cls': loss_cls, 'loss_box_reg': loss_box}


def mask_targets(gt_masks: jax.Array, boxes: jax.Array, matched: jax.Array, *,
                 size: int = 28, rule: str = 'detectron2', chunk: int = 16,
                 image_sizes: jax.Array | None = None) -> jax.Array:
  """Returns (B, M, size, size) float targets: GT masks (B, G, H, W) cropped to (B, M, 4) boxes.

  `matched` (B, M) picks each box's ground-truth mask. 'detectron2': RoIAlign aligned=True,
  adaptive sampling, >= 0.5 (0/1 targets); 'torchvision': aligned=False, adaptive, soft.
  `image_sizes` (B, 2): each image's (h, w) inside the padded canvas; both libraries sample
  the image-sized mask, so samples past its last row/column clamp to it (default: the canvas).
  """
  if rule not in MASK_TARGET_RULES:
    raise ValueError(f'mask target rule must be one of {MASK_TARGET_RULES}, got {rule!r}')
  g = gt_masks.shape[1]

  # Mapped over the images (as `pool`): each image's boxes read its own masks, so a batch
  # split over devices keeps every image's masks on its own device.
  def one(masks, image_boxes, image_matched, image_size):
    map_sizes = None if image_size is None else jnp.broadcast_to(image_size, (g, 2))
    return roi_ops.roi_align_maps(masks, image_boxes, image_matched.astype(jnp.int32), size,
                                  sampling_ratio=0, aligned=rule == 'detectron2',
                                  chunk=chunk, map_sizes=map_sizes)

  sizes = None if image_sizes is None else jnp.asarray(image_sizes, jnp.int32)
  out = jax.vmap(one)(gt_masks, jax.lax.stop_gradient(boxes), matched, sizes)
  if rule == 'detectron2':
    out = (out >= 0.5).astype(jnp.float32)
  return out


def mask_loss(mask_logits: jax.Array, classes: jax.Array, targets: jax.Array,
              valid: jax.Array) -> jax.Array:
  """Returns the mean binary cross-entropy of the (B, M, 28, 28, K) logits' class channel.

  Mean over the pixels of the `valid` (B, M) RoIs; 0 when there are none (both libraries).
  """
  k = mask_logits.shape[-1]
  x = jnp.take_along_axis(mask_logits.astype(jnp.float32),
                          jnp.clip(classes, 0, k - 1)[:, :, None, None, None], axis=-1)[..., 0]
  bce = jnp.maximum(x, 0.0) - x * targets + jnp.log1p(jnp.exp(-jnp.abs(x)))
  pixels = targets.shape[-1] * targets.shape[-2]
  num = jnp.maximum(jnp.sum(valid) * pixels, 1).astype(jnp.float32)
  return jnp.sum(jnp.where(valid[:, :, None, None], bce, 0.0)) / num


def roi_losses(config: RoIHeadsConfig, box_head: Callable, box_predictor: Callable,
               mask_head: Callable | None, features: Sequence[jax.Array], proposals: jax.Array,
               proposal_valid: jax.Array, gt_boxes: jax.Array, gt_classes: jax.Array,
               gt_valid: jax.Array, gt_masks: jax.Array | None = None,
               key: jax.Array | None = None,
               sample_masks: tuple[jax.Array, jax.Array] | None = None,
               image_sizes: jax.Array | None = None
               ) -> tuple[dict[str, jax.Array], RoISamples]:
  """Returns ({'loss_cls', 'loss_box_reg'[, 'loss_mask']}, samples) of one training step.

  `box_head`, `box_predictor`, `mask_head` are the (bound) modules; `features` the FPN levels
  P2..P5 (NHWC); `gt_masks` (B, G, H, W) full-image masks when `mask_head` is given, on the
  padded canvas, the images' true (h, w) in `image_sizes` (B, 2).
  """
  samples = sample_rois(key, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
                        num_classes=config.num_classes,
                        batch_size_per_image=config.batch_size_per_image,
                        positive_fraction=config.positive_fraction,
                        iou_threshold=config.iou_threshold, box_weights=config.box_weights,
                        sample_masks=sample_masks)
  pooled = pool(config, features, samples.boxes, config.box_pool_size)
  logits, deltas = box_predictor(box_head(pooled))
  losses = box_losses(logits, deltas, samples, smooth_l1_beta=config.smooth_l1_beta)
  if mask_head is not None:
    if gt_masks is None:
      raise ValueError('the mask head needs gt_masks (B, G, H, W)')
    p = config.num_mask_slots
    mask_boxes = samples.boxes[:, :p]
    mask_logits = mask_head(pool(config, features, mask_boxes, config.mask_pool_size))
    targets = mask_targets(gt_masks, mask_boxes, samples.matched[:, :p],
                           size=mask_logits.shape[-2], rule=config.mask_target_rule,
                           image_sizes=image_sizes)
    losses['loss_mask'] = mask_loss(mask_logits, samples.classes[:, :p], targets,
                                    samples.foreground[:, :p])
  return losses, samples


# ---------------------------------------------------------------------------- inference


class Detections(NamedTuple):
  """Fixed-size detections: (B, D) with `valid`; invalid entries are zeros.

  boxes (B, D, 4) in the coordinates of the proposals (the resized image), scores (B, D),
  classes (B, D) int32 in 0..K-1, proposal_index (B, D) the proposal each came from,
  masks (B, D, 28, 28) mask probabilities when a mask head ran, else None.
  """
  boxes: jax.Array
  scores: jax.Array
  classes: jax.Array
  valid: jax.Array
  proposal_index: jax.Array
  masks: jax.Array | None = None


def detect(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
           proposal_valid: jax.Array, image_sizes: jax.Array, *, score_threshold: float = 0.05,
           nms_threshold: float = 0.5, max_detections: int = 100, min_box_size: float = 0.0,
           max_candidates: int = 2048,
           box_weights: Sequence[float] = BOX_WEIGHTS) -> Detections:
  """Returns the `Detections` of (B, R, K + 1) logits and (B, R, 4K) deltas of (B, R) proposals.

  `image_sizes` (B, 2) is each image's (height, width) for clipping. See the module
  docstring for `max_candidates`; `min_box_size` 1e-2 is torchvision's small-box removal.
  """
  b, r, k1 = class_logits.shape
  k = k1 - 1
  n = r * k
  top = min(max_candidates, n)

  def one(logits, deltas, props, pvalid, size):
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :k]
    boxes = box_ops.decode(deltas.astype(jnp.float32).reshape(r, k, 4),
                           props.astype(jnp.float32)[:, None, :], box_weights)
    boxes = box_ops.clip(boxes, size[0], size[1]).reshape(n, 4)
    scores = probs.reshape(n)
    classes = jnp.tile(jnp.arange(k, dtype=jnp.int32), r)
    rows = jnp.repeat(jnp.arange(r, dtype=jnp.int32), k)
    valid = (scores > score_threshold) & pvalid[rows] & jnp.all(jnp.isfinite(boxes), -1)
    valid &= jnp.isfinite(scores)
    if min_box_size > 0:
      valid &= box_ops.nonempty(boxes, min_box_size)
    boxes = jnp.where(valid[:, None], boxes, 0.0)
    _, cand = jax.lax.top_k(jnp.where(valid, scores, -1.0), top)
    keep, kvalid = box_ops.batched_nms(boxes[cand], scores[cand], classes[cand], valid[cand],
                                       nms_threshold, max_detections)
    idx = cand[keep]
    zero = lambda a: jnp.where(kvalid.reshape(-1, *([1] * (a.ndim - 1))), a, 0)  # noqa: E731
    return (zero(boxes[idx]), zero(scores[idx]), zero(classes[idx]), kvalid, zero(rows[idx]))

  out = jax.vmap(one)(class_logits, box_deltas, proposals, proposal_valid,
                      jnp.asarray(image_sizes))
  return Detections(*out)


def mask_probabilities(mask_logits: jax.Array, classes: jax.Array) -> jax.Array:
  """Returns sigmoid of the (..., 28, 28, K) logits' channel `classes` (...): (..., 28, 28)."""
  k = mask_logits.shape[-1]
  x = jnp.take_along_axis(mask_logits.astype(jnp.float32),
                          jnp.clip(classes, 0, k - 1)[..., None, None, None], axis=-1)[..., 0]
  return jax.nn.sigmoid(x)


def roi_inference(config: RoIHeadsConfig, box_head: Callable, box_predictor: Callable,
                  mask_head: Callable | None, features: Sequence[jax.Array],
                  proposals: jax.Array, proposal_valid: jax.Array,
                  image_sizes: jax.Array) -> Detections:
  """Returns the `Detections` (with 28x28 mask probabilities if `mask_head`) of a batch."""
  pooled = pool(config, features, jax.lax.stop_gradient(proposals), config.box_pool_size)
  logits, deltas = box_predictor(box_head(pooled))
  dets = detect(logits, deltas, proposals, proposal_valid, image_sizes,
                score_threshold=config.score_threshold, nms_threshold=config.nms_threshold,
                max_detections=config.max_detections, min_box_size=config.min_box_size,
                max_candidates=config.max_candidates, box_weights=config.box_weights)
  if mask_head is not None:
    mask_logits = mask_head(pool(config, features, dets.boxes, config.mask_pool_size))
    dets = dets._replace(masks=mask_probabilities(mask_logits, dets.classes))
  return dets


# ------------------------------------------------------------------------------ pasting


def _d2_paste_matrix(lo: jax.Array, hi: jax.Array, size: int, m: int) -> jax.Array:
  """(size, m): Detectron2's grid_sample weights of canvas pixels over a box [lo, hi]."""
  centre = jnp.arange(size, dtype=jnp.float32) + 0.5
  g = (centre - lo) / (hi - lo) * 2.0 - 1.0                       # normalised grid coordinate
  src = ((g + 1.0) * m - 1.0) / 2.0                   # grid_sample's align_corners=False
  src = jnp.where(hi > lo, src, -2.0)                               # empty box: nothing
  low = jnp.floor(src)
  frac = src - low
  idx = jnp.arange(m, dtype=jnp.float32)
  return (jnp.where(idx[None, :] == low[:, None], 1.0 - frac[:, None], 0.0)
          + jnp.where(idx[None, :] == low[:, None] + 1.0, frac[:, None], 0.0))


def _tv_paste_matrix(lo: jax.Array, hi: jax.Array, size: int, m: int) -> jax.Array:
  """(size, m + 2): torchvision's paste of the padded mask over the integer box [lo, hi]."""
  scale = (m + 2.0) / m
  half = (hi - lo) * 0.5 * scale
  centre = (hi + lo) * 0.5
  start = jnp.trunc(centre - half).astype(jnp.int32)              # `.to(torch.int64)`
  end = jnp.trunc(centre + half).astype(jnp.int32)
  length = jnp.maximum(end - start + 1, 1)
  pix = jnp.arange(size, dtype=jnp.int32)
  dst = (pix - start).astype(jnp.float32)
  inside = (pix >= start) & (pix <= end)
  ratio = (m + 2.0) / length.astype(jnp.float32)                   # F.interpolate's in/out
  src = jnp.maximum(ratio * (dst + 0.5) - 0.5, 0.0)
  low = jnp.floor(src)
  nxt = jnp.where(low < m + 1, low + 1.0, low)
  frac = jnp.clip(src - low, 0.0, 1.0)
  idx = jnp.arange(m + 2, dtype=jnp.float32)
  w = (jnp.where(idx[None, :] == low[:, None], 1.0 - frac[:, None], 0.0)
       + jnp.where(idx[None, :] == nxt[:, None], frac[:, None], 0.0))
  return jnp.where(inside[:, None], w, 0.0)


def paste_masks(masks: jax.Array, boxes: jax.Array, height: int, width: int, *,
                rule: str = 'detectron2') -> jax.Array:
  """Returns (..., height, width) soft masks: (..., M, M) masks pasted into their (..., 4) boxes.

  'detectron2': `paste_masks_in_image` without its threshold (bilinear sampling of the mask
  at every pixel centre, zero outside); 'torchvision': `paste_masks_in_image` (padding 1).
  Boxes are in canvas pixels (scale them to the original image first, as both libraries do).
  """
  if rule not in PASTE_RULES:
    raise ValueError(f'paste rule must be one of {PASTE_RULES}, got {rule!r}')
  lead = masks.shape[:-2]
  m = masks.shape[-1]
  masks = masks.reshape(-1, m, m).astype(jnp.float32)
  boxes = boxes.reshape(-1, 4).astype(jnp.float32)
  if rule == 'torchvision':
    masks = jnp.pad(masks, ((0, 0), (1, 1), (1, 1)))
    matrix = _tv_paste_matrix
  else:
    matrix = _d2_paste_matrix
  hi = jax.lax.Precision.HIGHEST

  def one(mask, box):
    wy = matrix(box[1], box[3], height, m)
    wx = matrix(box[0], box[2], width, m)
    return jnp.dot(jnp.dot(wy, mask, precision=hi), wx.T, precision=hi)

  return jax.vmap(one)(masks, boxes).reshape(*lead, height, width)
