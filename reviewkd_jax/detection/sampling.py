"""Matching anchors/proposals to ground truth, and sampling them for the losses, statically.

`match` is Detectron2's `Matcher` (== torchvision's `Matcher`): each prediction takes the ground
truth of highest IoU; IoU below the low threshold makes it background (0), between the
thresholds ignored (-1), at or above the high one foreground (1); with `allow_low_quality`, every
prediction that is some ground truth's best match (ties included) is foreground as well.

`sample` is `BalancedPositiveNegativeSampler` / `subsample_labels`: at most
`num * positive_fraction` foreground, the rest of `num` background, each chosen uniformly at
random without replacement. Ours draws from a `jax.random` key (reproducible from the step's
key) and returns masks of the input's fixed shape instead of index lists.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def match(quality: jax.Array, gt_valid: jax.Array, low: float, high: float,
          allow_low_quality: bool) -> tuple[jax.Array, jax.Array]:
  """Returns (matched ground-truth index (N,), label (N,) in {1, 0, -1}).

  Args:
    quality: (G, N) IoU of G (padded) ground-truth boxes with N predictions.
    gt_valid: (G,) which ground-truth rows are real. With none, every label is 0.
    low, high: the thresholds (RPN 0.3 / 0.7; RoI heads 0.5 / 0.5).
    allow_low_quality: also make each ground truth's best predictions foreground.
  """
  quality = jnp.where(gt_valid[:, None], quality, -1.0)
  matched = jnp.argmax(quality, axis=0)
  best = jnp.max(quality, axis=0)
  labels = jnp.where(best >= high, 1, jnp.where(best < low, 0, -1)).astype(jnp.int32)
  if allow_low_quality:
    highest = jnp.max(quality, axis=1, keepdims=True)
    is_best = jnp.any((quality == highest) & gt_valid[:, None], axis=0)
    labels = jnp.where(is_best, 1, labels)
  labels = jnp.where(jnp.any(gt_valid), labels, 0)
  return matched, labels


def random_subset(key: jax.Array, candidates: jax.Array, count) -> jax.Array:
  """Returns a mask of `min(count, candidates.sum())` entries drawn uniformly from `candidates`."""
  r = jnp.where(candidates, jax.random.uniform(key, candidates.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(r))
  return candidates & (rank < count)


def sample(key: jax.Array, labels: jax.Array, num: int,
           positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """Returns (positive mask, negative mask) of `labels` (N,) as the balanced sampler draws them.

  At most int(num * positive_fraction) positives (label 1); negatives (label 0) fill the rest
  of `num`, limited by how many there are. Label -1 is never drawn.
  """
  pos_key, neg_key = jax.random.split(key)
  positive = labels == 1
  negative = labels == 0
  num_pos = jnp.minimum(jnp.sum(positive), int(num * positive_fraction))
  num_neg = jnp.minimum(jnp.sum(negative), num - num_pos)
  return (random_subset(pos_key, positive, num_pos),
          random_subset(neg_key, negative, num_neg))
