"""Region Proposal Network with static shapes: head, proposals, and losses.

The three parts of Detectron2's `RPN` and of torchvision's `RegionProposalNetwork`:
`RPNHead` (a shared 3x3 conv, then A objectness logits and 4A deltas per location, flattened
location-major), `propose` (per level top-k, decode, clip, small boxes removed, NMS per level,
the best over all levels; fixed-size outputs with a `valid` mask, no gradient) and
`rpn_losses` (anchor matching, 256 sampled anchors per image, objectness BCE and box
regression). The libraries' different constants and rules are options of `RPNConfig`
(Detectron2's by default, `RPNConfig.torchvision()`); docs/detection.md (Module notes:
rpn.py) lists them and where we differ from both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reviewkd_jax.detection import boxes as box_ops
from reviewkd_jax.detection.anchors import AnchorConfig
from reviewkd_jax.detection.sampling import match, sample
from reviewkd_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RPNConfig:
  """The RPN's constants and rules; Detectron2's (Base-RCNN-FPN) by default.

  Attributes:
    anchors: the anchor rules (`AnchorConfig`, or `AnchorConfig.torchvision()`).
    pre_nms_topk: (train, test) proposals kept per level before NMS.
    post_nms_topk: (train, test) proposals kept per image after NMS.
    nms_threshold: IoU above which NMS suppresses a box (within a level).
    min_size: keep boxes with both sides > 0 (0, Detectron2) or >= min_size (torchvision 1e-3).
    nms_on_probabilities: rank boxes for NMS by sigmoid(logit) (torchvision) not the logit.
    iou_thresholds: (low, high) of the anchor matcher.
    allow_low_quality: also label each ground truth's best anchors foreground.
    batch_size_per_image: anchors sampled per image for the losses.
    positive_fraction: at most this fraction of them foreground.
    box_weights: the box coder's (wx, wy, ww, wh).
    loss: 'detectron2' (sums / (batch_size_per_image * images)) or 'torchvision' (BCE mean over
      the sampled anchors, box loss sum / number sampled).
    smooth_l1_beta: of the box loss; 0 is L1 (Detectron2), torchvision 1/9.
  """
  anchors: AnchorConfig = AnchorConfig()
  pre_nms_topk: tuple[int, int] = (2000, 1000)
  post_nms_topk: tuple[int, int] = (1000, 1000)
  nms_threshold: float = 0.7
  min_size: float = 0.0
  nms_on_probabilities: bool = False
  iou_thresholds: tuple[float, float] = (0.3, 0.7)
  allow_low_quality: bool = True
  batch_size_per_image: int = 256
  positive_fraction: float = 0.5
  box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
  loss: str = 'detectron2'
  smooth_l1_beta: float = 0.0

  def __post_init__(self):
    if self.loss not in ('detectron2', 'torchvision'):
      raise ValueError(f"RPNConfig.loss must be 'detectron2' or 'torchvision', got {self.loss!r}")

  @classmethod
  def torchvision(cls, **overrides) -> 'RPNConfig':
    """Returns torchvision's `fasterrcnn_resnet50_fpn` RPN (anchors, top-k, sizes, loss)."""
    tv = cls(anchors=AnchorConfig.torchvision(), post_nms_topk=(2000, 1000), min_size=1e-3,
             nms_on_probabilities=True, loss='torchvision', smooth_l1_beta=1.0 / 9)
    return dataclasses.replace(tv, **overrides)

  @property
  def num_anchors(self) -> int:
    """Anchors per location (the head's A)."""
    return self.anchors.num_anchors


class RPNHead(nn.Module):
  """The shared RPN head: 3x3 conv + ReLU, then 1x1 convs to A logits and 4A deltas.

  Called on the list of NHWC FPN levels, returns (objectness, deltas): per level (N, H*W*A)
  logits and (N, H*W*A, 4) deltas in float32, in the anchors' order (`anchors.grid_anchors`).
  Submodules `conv`, `objectness`, `deltas` (torchvision's `head.conv.0.0`, `head.cls_logits`,
  `head.bbox_pred`; Detectron2's `rpn_head.conv`, `.objectness_logits`, `.anchor_deltas`).
  """
  num_anchors: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> tuple[list[Array], list[Array]]:
    channels = features[0].shape[-1]
    init = nn.initializers.normal(stddev=0.01)
    conv = layers.conv(channels, 3, use_bias=True, kernel_init=init, dtype=self.dtype,
                       name='conv')
    objectness = layers.conv(self.num_anchors, 1, use_bias=True, kernel_init=init,
                             dtype=self.dtype, name='objectness')
    deltas = layers.conv(4 * self.num_anchors, 1, use_bias=True, kernel_init=init,
                         dtype=self.dtype, name='deltas')
    logits_out, deltas_out = [], []
    for x in features:
      if x.shape[-1] != channels:
        raise ValueError(f'every level needs {channels} channels, got {x.shape}')
      t = nn.relu(conv(x))
      n, h, w, _ = t.shape
      logits_out.append(objectness(t).astype(jnp.float32).reshape(n, h * w * self.num_anchors))
      deltas_out.append(deltas(t).astype(jnp.float32).reshape(n, h * w * self.num_anchors, 4))
    return logits_out, deltas_out


class Proposals(NamedTuple):
  """The RPN's output per image, `post_nms_topk` rows, best first.

  Attributes:
    boxes: (B, P, 4) proposals, clipped to each image's true size; zeros where not valid.
    logits: (B, P) their objectness logits; -inf where not valid.
    valid: (B, P) which rows are proposals (the first `valid.sum(1)` of each image).
  """
  boxes: Array
  logits: Array
  valid: Array


def _top_k_per_level(config: RPNConfig, anchors: Sequence[Any], objectness: Sequence[Array],
                     deltas: Sequence[Array], training: bool):
  """Returns (boxes (B, L, K, 4), logits (B, L, K), valid (B, L, K)): decoded top-k per level."""
  pre = config.pre_nms_topk[0 if training else 1]
  ks = [min(pre, int(o.shape[1])) for o in objectness]
  big_k = max(ks)
  all_boxes, all_logits, all_valid = [], [], []
  for anchors_l, logits_l, deltas_l, k in zip(anchors, objectness, deltas, ks):
    top, idx = jax.lax.top_k(logits_l, k)                       # (B, k)
    d = jnp.take_along_axis(deltas_l, idx[..., None], axis=1)   # (B, k, 4)
    a = jnp.asarray(anchors_l)[idx]                             # (B, k, 4)
    b = box_ops.decode(d, a, config.box_weights)
    pad = big_k - k
    all_boxes.append(jnp.pad(b, ((0, 0), (0, pad), (0, 0))))
    all_logits.append(jnp.pad(top, ((0, 0), (0, pad))))
    all_valid.append(jnp.broadcast_to(jnp.arange(big_k) < k, top.shape[:1] + (big_k,)))
  return (jnp.stack(all_boxes, 1), jnp.stack(all_logits, 1), jnp.stack(all_valid, 1))


def _select_one_image(config: RPNConfig, boxes: Array, logits: Array, valid: Array,
                      image_size: Array, post: int) -> tuple[Array, Array, Array]:
  """Clip, filter, NMS per level and keep the best `post` of one image's (L, K) candidates."""
  num_levels, big_k = logits.shape
  boxes = box_ops.clip(boxes, image_size[0], image_size[1])
  finite = jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(logits)
  valid = valid & finite & box_ops.nonempty(boxes, config.min_size)
  scores = jax.nn.sigmoid(logits) if config.nms_on_probabilities else logits
  per_level = min(post, big_k)
  keep, keep_valid = jax.vmap(
      lambda b, s, v: box_ops.nms(b, s, v, config.nms_threshold, per_level))(boxes, scores, valid)
  level = jnp.arange(num_levels)[:, None]
  kept_boxes = boxes[level, keep].reshape(-1, 4)
  kept_logits = logits[level, keep].reshape(-1)
  kept_scores = scores[level, keep].reshape(-1)
  kept_valid = keep_valid.reshape(-1)
  # Flattened level-major with each level's survivors by (score desc, top-k rank), so a stable
  # sort by score breaks ties by (level, rank): the coordinate-offset trick's order.
  order = jnp.argsort(jnp.where(kept_valid, -kept_scores, jnp.inf), stable=True)[:post]
  out_valid = kept_valid[order]
  out_boxes = jnp.where(out_valid[:, None], kept_boxes[order], 0.0)
  out_logits = jnp.where(out_valid, kept_logits[order], -jnp.inf)
  if order.shape[0] < post:
    pad = post - order.shape[0]
    out_boxes = jnp.pad(out_boxes, ((0, pad), (0, 0)))
    out_logits = jnp.pad(out_logits, (0, pad), constant_values=-jnp.inf)
    out_valid = jnp.pad(out_valid, (0, pad))
  return out_boxes, out_logits, out_valid


def propose(config: RPNConfig, anchors: Sequence[Any], objectness: Sequence[Array],
            deltas: Sequence[Array], image_sizes: Array, *, training: bool) -> Proposals:
  """Returns the proposals of a batch (static shapes; no gradient flows through them).

  Args:
    config: the RPN's rules (top-k sizes by `training`, NMS, minimum size).
    anchors: per level (H*W*A, 4) anchors (`anchors.grid_anchors`), shared by the batch.
    objectness: per level (B, H*W*A) logits (`RPNHead`).
    deltas: per level (B, H*W*A, 4) box deltas (`RPNHead`).
    image_sizes: (B, 2) true (height, width) of each image inside the padded batch; may be a
      traced array.
    training: selects the (train, test) top-k sizes.
  """
  if not len(anchors) == len(objectness) == len(deltas):
    raise ValueError(f'{len(anchors)} anchor levels, {len(objectness)} objectness levels and '
                     f'{len(deltas)} delta levels')
  objectness = [jax.lax.stop_gradient(o) for o in objectness]
  deltas = [jax.lax.stop_gradient(d) for d in deltas]
  post = config.post_nms_topk[0 if training else 1]
  boxes, logits, valid = _top_k_per_level(config, anchors, objectness, deltas, training)
  image_sizes = jnp.asarray(image_sizes, jnp.float32)
  out = jax.vmap(lambda b, s, v, size: _select_one_image(config, b, s, v, size, post))(
      boxes, logits, valid, image_sizes)
  return Proposals(*out)


def label_anchors(config: RPNConfig, anchors: Array, gt_boxes: Array,
                  gt_valid: Array) -> tuple[Array, Array]:
  """Returns one image's (labels (N,) in {1, 0, -1}, matched ground-truth boxes (N, 4)).

  Args:
    config: the matcher's thresholds.
    anchors: (N, 4) all anchors, levels concatenated.
    gt_boxes: (G, 4) padded ground truth (G >= 1; pad with invalid rows).
    gt_valid: (G,) which rows are real. With none, every anchor is background.
  """
  low, high = config.iou_thresholds
  matched, labels = match(box_ops.box_iou(gt_boxes, anchors), gt_valid, low, high,
                          config.allow_low_quality)
  return labels, gt_boxes[matched]


def _smooth_l1(x: Array, beta: float) -> Array:
  """Elementwise smooth-L1 of a difference `x` (L1 for beta < 1e-5, as both libraries)."""
  ax = jnp.abs(x)
  if beta < 1e-5:
    return ax
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def rpn_losses(config: RPNConfig, anchors: Sequence[Any], objectness: Sequence[Array],
               deltas: Sequence[Array], gt_boxes: Array, gt_valid: Array, *,
               key: Array | None = None,
               samples: tuple[Array, Array] | None = None) -> dict[str, Array]:
  """Returns {'loss_rpn_cls', 'loss_rpn_loc'}: the RPN's objectness and box losses.

  Args:
    config: matcher, sampler and loss flavour (`config.loss`, `config.smooth_l1_beta`).
    anchors: per level (H*W*A, 4) anchors, shared by the batch.
    objectness: per level (B, H*W*A) logits.
    deltas: per level (B, H*W*A, 4) predicted deltas.
    gt_boxes: (B, G, 4) padded ground-truth boxes.
    gt_valid: (B, G) which of them are real.
    key: draws the sampled anchors (split into one key per image).
    samples: instead of `key`, the sampled (positive, negative) masks, each (B, N) over all
      anchors (levels concatenated); positives must be anchors labelled 1, negatives 0.
  """
  if (key is None) == (samples is None):
    raise ValueError('rpn_losses needs exactly one of `key` and `samples`')
  all_anchors = jnp.concatenate([jnp.asarray(a) for a in anchors], axis=0)
  logits = jnp.concatenate(objectness, axis=1)
  pred = jnp.concatenate(deltas, axis=1)
  num_images = logits.shape[0]
  labels, matched = jax.vmap(lambda g, v: label_anchors(config, all_anchors, g, v))(
      gt_boxes, gt_valid)
  if samples is None:
    keys = jax.random.split(key, num_images)
    positive, negative = jax.vmap(
        lambda k, lab: sample(k, lab, config.batch_size_per_image, config.positive_fraction))(
            keys, labels)
  else:
    positive, negative = (jnp.asarray(m, bool) for m in samples)
  targets = box_ops.encode(all_anchors[None], matched, config.box_weights)
  # Padded / background matches can give inf targets: zero them (not just mask the loss), so
  # that no NaN reaches the gradient through 0 * inf.
  targets = jax.lax.stop_gradient(jnp.where(positive[..., None], targets, 0.0))
  box_loss = jnp.sum(jnp.where(positive[..., None],
                               _smooth_l1(pred - targets, config.smooth_l1_beta), 0.0))
  y = positive.astype(logits.dtype)
  bce = jax.nn.softplus(logits) - logits * y   # BCE with logits, stable for large |x|
  sampled = positive | negative
  cls_loss = jnp.sum(jnp.where(sampled, bce, 0.0))
  if config.loss == 'detectron2':
    normalizer = float(config.batch_size_per_image * num_images)
  else:
    normalizer = jnp.maximum(jnp.sum(sampled), 1).astype(logits.dtype)
  return {'loss_rpn_cls': cls_loss / normalizer, 'loss_rpn_loc': box_loss / normalizer}


def num_anchors_per_level(anchors: Sequence[Any]) -> list[int]:
  """Returns the number of anchors of each level (to split concatenated per-anchor arrays)."""
  return [int(np.shape(a)[0]) for a in anchors]
