"""Box arithmetic for the detectors, with static shapes: IoU, the box coder, clipping, NMS.

Boxes are (..., 4) arrays of (x1, y1, x2, y2) in pixels of the resized (unpadded) image, no
"+1" (Detectron2's and torchvision's convention since 2019). Every function is jit-able with
fixed sizes: where Detectron2 drops boxes, these functions return a boolean `valid` mask
beside fixed-size arrays, and padded entries are carried with `valid=False`.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# Detectron2's `_DEFAULT_SCALE_CLAMP` and torchvision's `bbox_xform_clip`: the same value.
SCALE_CLAMP = math.log(1000.0 / 16)


def area(boxes: jax.Array) -> jax.Array:
  """Returns the areas of (..., 4) boxes."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Returns the (N, M) IoU of boxes `a` (N, 4) and `b` (M, 4); 0 where the union is empty."""
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def encode(reference: jax.Array, target: jax.Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
  """Returns the deltas (dx, dy, dw, dh) that take `reference` boxes to `target` boxes.

  Detectron2's `Box2BoxTransform.get_deltas` == torchvision's `BoxCoder.encode_single`:
  dx = wx * (gx - px) / pw, dw = ww * log(gw / pw), centres at x1 + w / 2.
  """
  wx, wy, ww, wh = weights
  pw = reference[..., 2] - reference[..., 0]
  ph = reference[..., 3] - reference[..., 1]
  px = reference[..., 0] + 0.5 * pw
  py = reference[..., 1] + 0.5 * ph
  gw = target[..., 2] - target[..., 0]
  gh = target[..., 3] - target[..., 1]
  gx = target[..., 0] + 0.5 * gw
  gy = target[..., 1] + 0.5 * gh
  return jnp.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                    ww * jnp.log(gw / pw), wh * jnp.log(gh / ph)], axis=-1)


def decode(deltas: jax.Array, reference: jax.Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           scale_clamp: float = SCALE_CLAMP) -> jax.Array:
  """Returns the boxes that `deltas` (..., 4) make of `reference` boxes (broadcastable).

  The inverse of `encode`, with dw and dh clamped at `scale_clamp` before the exponential
  (both libraries do so, with the same value).
  """
  wx, wy, ww, wh = weights
  reference = reference.astype(deltas.dtype)
  pw = reference[..., 2] - reference[..., 0]
  ph = reference[..., 3] - reference[..., 1]
  px = reference[..., 0] + 0.5 * pw
  py = reference[..., 1] + 0.5 * ph
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  cx = dx * pw + px
  cy = dy * ph + py
  w = jnp.exp(dw) * pw
  h = jnp.exp(dh) * ph
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip(boxes: jax.Array, height, width) -> jax.Array:
  """Returns `boxes` clipped to [0, width] x [0, height] (scalars or arrays broadcasting)."""
  height = jnp.asarray(height, boxes.dtype)
  width = jnp.asarray(width, boxes.dtype)
  x1 = jnp.clip(boxes[..., 0], 0, width)
  y1 = jnp.clip(boxes[..., 1], 0, height)
  x2 = jnp.clip(boxes[..., 2], 0, width)
  y2 = jnp.clip(boxes[..., 3], 0, height)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonempty(boxes: jax.Array, min_size: float = 0.0) -> jax.Array:
  """Returns where both sides exceed `min_size` (Detectron2) / are >= it (torchvision's 1e-3).

  Detectron2's `Boxes.nonempty(threshold)` keeps w > t and h > t; torchvision's
  `remove_small_boxes(min_size)` keeps w >= min_size and h >= min_size. With t = 0 and
  min_size = 1e-3 on float32 boxes the two differ only for sides in (0, 1e-3).
  """
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  if min_size > 0:
    return (w >= min_size) & (h >= min_size)
  return (w > 0) & (h > 0)


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float,
        max_output: int) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS with static shapes; returns (indices (max_output,), valid (max_output,)).

  The rule of torchvision's and Detectron2's kernels: visit boxes by descending score, keep a
  box unless a kept box overlaps it with IoU > `iou_threshold`. Entries with `valid=False` are
  never kept. The kept indices come in descending score order; when fewer than `max_output`
  survive, the tail repeats index 0 with `valid=False`. Cost O(N^2) in memory and time for N
  boxes, as one dense IoU matrix (the GPU kernels use the same matrix in bit-mask form).
  """
  n = boxes.shape[0]
  scores = jnp.where(valid, scores, -jnp.inf)
  order = jnp.argsort(-scores, stable=True)
  sorted_boxes = boxes[order]
  keep = valid[order]
  iou = box_iou(sorted_boxes, sorted_boxes)
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
  suppress = (iou > iou_threshold) & later

  def body(i, keep):
    return keep & ~(keep[i] & suppress[i])

  keep = jax.lax.fori_loop(0, n, body, keep)
  # Kept entries first, each group in score order (the sort is stable).
  pick = jnp.argsort(~keep, stable=True)[:max_output]
  out_valid = keep[pick]
  if max_output > n:
    pad = max_output - n
    pick = jnp.concatenate([pick, jnp.zeros((pad,), pick.dtype)])
    out_valid = jnp.concatenate([out_valid, jnp.zeros((pad,), bool)])
  return jnp.where(out_valid, order[pick], 0), out_valid


def batched_nms(boxes: jax.Array, scores: jax.Array, groups: jax.Array, valid: jax.Array,
                iou_threshold: float, max_output: int) -> tuple[jax.Array, jax.Array]:
  """NMS within each group (class or FPN level) separately; same outputs as `nms`.

  Boxes of different groups are moved apart by group * (largest coordinate + 1) so that they
  never overlap, then one NMS runs: torchvision's and Detectron2's `batched_nms` trick, exact.
  """
  big = jnp.max(jnp.where(valid[:, None], boxes, 0.0)) + 1.0
  shifted = boxes + (groups.astype(boxes.dtype) * big)[:, None]
  return nms(shifted, scores, valid, iou_threshold, max_output)
