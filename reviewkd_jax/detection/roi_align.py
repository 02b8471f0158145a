"""RoIAlign with static shapes: one feature map, the FPN pyramid (P2..P5), single-channel maps.

The sampling rule of torchvision's and Detectron2's `ROIAlign` kernel (`aligned` either
way), as gathers of the 4 bilinear corners of every sample from one flat buffer of all levels
(`roi_align`, `multiscale_roi_align`: never a (R, C, H, W) array); FPN level assignment by
either library's rule; a fixed `sampling_ratio` or Detectron2's adaptive count capped at
`max_sampling_ratio` (exact under the cap). `roi_align_maps` is RoIAlign of single-channel
maps (the mask targets) as A_y @ map @ A_x^T with interpolation matrices. The rules, their
sources and the precision are in docs/detection.md (Module notes: roi_align.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from reviewkd_jax.detection import boxes as box_ops

LEVEL_RULES = ('detectron2', 'torchvision')


def _pair(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _roi_frame(boxes: jax.Array, spatial_scale, aligned: bool):
  """Returns (start_x, start_y, roi_w, roi_h) in feature pixels, as the kernel computes them."""
  offset = 0.5 if aligned else 0.0
  x1 = boxes[..., 0] * spatial_scale - offset
  y1 = boxes[..., 1] * spatial_scale - offset
  x2 = boxes[..., 2] * spatial_scale - offset
  y2 = boxes[..., 3] * spatial_scale - offset
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  return x1, y1, roi_w, roi_h


def _divide(x: jax.Array, d) -> jax.Array:
  """Returns x / d as a true division, the way PyTorch computes it.

  XLA rewrites a division by a broadcast scalar as a multiplication by its reciprocal, 1 ulp
  off about half of the time: enough to turn ceil(49 / 7) into 8 (the adaptive sample count)
  or to move a box across an FPN level boundary. A full-shape divisor behind an optimisation
  barrier is not rewritten (checked on XLA:CPU; the rewrite is XLA's algebraic simplifier,
  shared by the GPU compiler).
  """
  return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape))


def _sample_coords(start: jax.Array, length: jax.Array, bins: int, grid, index) -> jax.Array:
  """Returns the coordinates (R, bins) of sample `index` of `grid` per bin along one axis."""
  bin_size = _divide(length, bins)
  p = jnp.arange(bins, dtype=start.dtype)
  return (start[:, None] + p[None, :] * bin_size[:, None]
          + (jnp.asarray(index, start.dtype) + 0.5) * _divide(bin_size, grid)[:, None])


def _axis_weights(coord: jax.Array, size: jax.Array):
  """Returns (low, high, w_low, w_high) of bilinear sampling along one axis of length `size`.

  The kernel's rule: coordinates outside [-1, size] weigh 0; others are clamped at 0, and at
  size - 1 both corners are the last pixel.
  """
  inside = (coord >= -1.0) & (coord <= size.astype(coord.dtype))
  c = jnp.maximum(coord, 0.0)
  low = jnp.floor(c).astype(jnp.int32)
  last = size - 1
  at_end = low >= last
  low = jnp.where(at_end, last, low)
  high = jnp.where(at_end, last, low + 1)
  c = jnp.where(at_end, low.astype(c.dtype), c)
  frac = c - low.astype(c.dtype)
  zero = jnp.zeros_like(frac)
  return low, high, jnp.where(inside, 1.0 - frac, zero), jnp.where(inside, frac, zero)


def _roi_align_flat(flat: jax.Array, boxes: jax.Array, base: jax.Array, height: jax.Array,
                    width: jax.Array, spatial_scale: jax.Array, output_size: tuple[int, int],
                    sampling_ratio: int, aligned: bool, max_sampling_ratio: int = 4
                    ) -> jax.Array:
  """RoIAlign from `flat` (T, C): RoI r reads the (height[r], width[r]) map at row base[r].

  `sampling_ratio` 0 is Detectron2's adaptive count, ceil(roi side / bins) samples per bin
  side, capped at `max_sampling_ratio` (the static loop bound; samples past a RoI's own count
  weigh 0), so it costs `max_sampling_ratio**2` gathers whatever the RoIs.
  """
  if sampling_ratio < 0 or (sampling_ratio == 0 and max_sampling_ratio < 1):
    raise ValueError(f'sampling_ratio must be an integer >= 1, or 0 (adaptive, capped at '
                     f'max_sampling_ratio >= 1), got {sampling_ratio} / {max_sampling_ratio}')
  out_h, out_w = output_size
  boxes = boxes.astype(jnp.float32)
  x1, y1, roi_w, roi_h = _roi_frame(boxes, spatial_scale, aligned)
  height = height.astype(jnp.int32)
  width = width.astype(jnp.int32)
  adaptive = sampling_ratio == 0
  if not adaptive:   # a Python constant: the program is the fixed-ratio one
    loops = grid_h = grid_w = sampling_ratio
  else:
    loops = max_sampling_ratio
    grid_h = jnp.clip(jnp.ceil(_divide(roi_h, out_h)), 1, loops)
    grid_w = jnp.clip(jnp.ceil(_divide(roi_w, out_w)), 1, loops)
  acc = jnp.zeros((boxes.shape[0], out_h, out_w, flat.shape[-1]), jnp.float32)
  for iy in range(loops):
    ys = _sample_coords(y1, roi_h, out_h, grid_h, iy)                    # (R, out_h)
    y_lo, y_hi, wy_lo, wy_hi = _axis_weights(ys, height[:, None])
    use_y = (iy < grid_h).astype(jnp.float32)[:, None] if adaptive else None
    for ix in range(loops):
      xs = _sample_coords(x1, roi_w, out_w, grid_w, ix)                  # (R, out_w)
      x_lo, x_hi, wx_lo, wx_hi = _axis_weights(xs, width[:, None])
      use_x = (ix < grid_w).astype(jnp.float32)[:, None] if adaptive else None
      rows = jnp.stack([y_lo, y_lo, y_hi, y_hi], -1)[:, :, None, :]      # (R, out_h, 1, 4)
      cols = jnp.stack([x_lo, x_hi, x_lo, x_hi], -1)[:, None, :, :]      # (R, 1, out_w, 4)
      wy = jnp.stack([wy_lo, wy_lo, wy_hi, wy_hi], -1)
      wx = jnp.stack([wx_lo, wx_hi, wx_lo, wx_hi], -1)
      if adaptive:
        wy, wx = wy * use_y[..., None], wx * use_x[..., None]
      wy, wx = wy[:, :, None, :], wx[:, None, :, :]
      index = base[:, None, None, None] + rows * width[:, None, None, None] + cols
      values = flat[index]                                               # (R, oh, ow, 4, C)
      acc = acc + jnp.einsum('rhwk,rhwkc->rhwc', wy * wx, values.astype(jnp.float32))
  if not adaptive:
    return (acc / float(sampling_ratio * sampling_ratio)).astype(flat.dtype)
  return (acc / (grid_h * grid_w)[:, None, None, None]).astype(flat.dtype)


def roi_align(features: jax.Array, boxes: jax.Array, batch_index: jax.Array,
              output_size, spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = True, max_sampling_ratio: int = 4) -> jax.Array:
  """Returns the (R, out_h, out_w, C) RoIAlign of NHWC `features` (torchvision's `roi_align`).

  Args:
    features: (N, H, W, C) feature map.
    boxes: (R, 4) boxes (x1, y1, x2, y2) in image pixels.
    batch_index: (R,) which image of `features` each box is on.
    output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per image pixel (1 / stride).
    sampling_ratio: samples per bin along each axis, a fixed int >= 1, or 0: adaptive
      (ceil(roi side / bins)), capped at `max_sampling_ratio`.
    aligned: Detectron2's ROIAlignV2 half-pixel shift (True) or the legacy rule (False).
  """
  n, h, w, c = features.shape
  r = boxes.shape[0]
  flat = features.reshape(n * h * w, c)
  base = batch_index.astype(jnp.int32) * (h * w)
  return _roi_align_flat(flat, boxes, base, jnp.full((r,), h, jnp.int32),
                         jnp.full((r,), w, jnp.int32), jnp.full((r,), spatial_scale, jnp.float32),
                         _pair(output_size), sampling_ratio, aligned, max_sampling_ratio)


def assign_levels(boxes: jax.Array, *, min_level: int = 2, max_level: int = 5,
                  rule: str = 'detectron2', canonical_box_size: float = 224.0,
                  canonical_level: int = 4) -> jax.Array:
  """Returns the FPN level (min_level..max_level, int32) of each (..., 4) box (FPN eq. 1).

  `rule` 'detectron2' or 'torchvision' (see the module docstring). Empty or degenerate boxes
  go to `min_level`.
  """
  if rule not in LEVEL_RULES:
    raise ValueError(f'level rule must be one of {LEVEL_RULES}, got {rule!r}')
  size = jnp.sqrt(jnp.maximum(box_ops.area(boxes.astype(jnp.float32)), 0.0))
  if rule == 'torchvision':
    level = jnp.floor(canonical_level + jnp.log2(_divide(size, canonical_box_size)) + 1e-6)
  else:
    level = jnp.floor(canonical_level + jnp.log2(_divide(size, canonical_box_size) + 1e-8))
  level = jnp.clip(jnp.nan_to_num(level, nan=min_level, neginf=min_level), min_level, max_level)
  return level.astype(jnp.int32)


def multiscale_roi_align(features: Sequence[jax.Array], boxes: jax.Array, batch_index: jax.Array,
                         output_size, *, min_level: int = 2, sampling_ratio: int = 2,
                         max_sampling_ratio: int = 4,
                         aligned: bool = True, level_rule: str = 'detectron2',
                         canonical_box_size: float = 224.0,
                         canonical_level: int = 4) -> jax.Array:
  """Returns the (R, out_h, out_w, C) pooled features of each box from its FPN level.

  torchvision's `MultiScaleRoIAlign` (aligned=False, ratio 2, torchvision level rule) and
  Detectron2's `ROIPooler` (ROIAlignV2: aligned=True; adaptive ratio, see the module
  docstring). Level l of `features` (NHWC, same N and C) has stride 2**l, from `min_level`
  up; each box is pooled from one level, chosen by `assign_levels`.
  """
  levels = list(features)
  max_level = min_level + len(levels) - 1
  n, c = levels[0].shape[0], levels[0].shape[-1]
  heights = [f.shape[1] for f in levels]
  widths = [f.shape[2] for f in levels]
  offsets = [0]
  for h, w in zip(heights, widths):
    offsets.append(offsets[-1] + n * h * w)
  flat = jnp.concatenate([f.reshape(-1, c) for f in levels], axis=0) if len(levels) > 1 else (
      levels[0].reshape(-1, c))
  level = assign_levels(boxes, min_level=min_level, max_level=max_level, rule=level_rule,
                        canonical_box_size=canonical_box_size, canonical_level=canonical_level)
  k = level - min_level
  height = jnp.asarray(heights, jnp.int32)[k]
  width = jnp.asarray(widths, jnp.int32)[k]
  scale = jnp.asarray([2.0 ** -(min_level + i) for i in range(len(levels))], jnp.float32)[k]
  base = jnp.asarray(offsets[:-1], jnp.int32)[k] + batch_index.astype(jnp.int32) * height * width
  return _roi_align_flat(flat, boxes, base, height, width, scale, _pair(output_size),
                         sampling_ratio, aligned, max_sampling_ratio)


def interpolation_matrix(start: jax.Array, length: jax.Array, size: int, bins: int,
                         grid: jax.Array, max_grid: int,
                         limit: jax.Array | None = None) -> jax.Array:
  """Returns (R, bins, size): RoIAlign along one axis as a matrix (weights / samples per bin).

  `grid` (R,) is the number of samples per bin of each RoI (<= `max_grid`, the static loop
  bound); RoIAlign of a (size,) signal is then `matrix @ signal`. `limit` (R,) is each RoI's
  true signal length (<= size; default size): samples are zeroed and clamped against it, as
  if the signal ended there (the padding after it is never read).
  """
  r = start.shape[0]
  limit = (jnp.full((r,), size, jnp.int32) if limit is None
           else jnp.minimum(jnp.asarray(limit, jnp.int32), size))
  grid = grid.astype(jnp.int32)
  inv = 1.0 / jnp.maximum(grid, 1).astype(jnp.float32)
  index = jnp.arange(max_grid, dtype=jnp.float32)
  coords = jax.vmap(lambda i: _sample_coords(start, length, bins, grid.astype(jnp.float32), i),
                    out_axes=-1)(index)                                # (R, bins, max_grid)
  lo, hi, w_lo, w_hi = _axis_weights(coords, limit[:, None, None])
  use = (index[None, :] < grid[:, None]) * inv[:, None]               # (R, max_grid)
  rows = jnp.broadcast_to(jnp.arange(r)[:, None, None, None], (r, bins, max_grid, 2))
  cols = jnp.broadcast_to(jnp.arange(bins)[None, :, None, None], (r, bins, max_grid, 2))
  weights = jnp.stack([w_lo, w_hi], -1) * use[:, None, :, None]
  return jnp.zeros((r, bins, size), jnp.float32).at[rows, cols, jnp.stack([lo, hi], -1)].add(
      weights)


def roi_align_maps(maps: jax.Array, boxes: jax.Array, map_index: jax.Array, output_size, *,
                   spatial_scale: float = 1.0, sampling_ratio: int = 0, aligned: bool = True,
                   max_sampling_ratio: int | None = None, chunk: int = 16,
                   map_sizes: jax.Array | None = None) -> jax.Array:
  """Returns the (R, out_h, out_w) RoIAlign of single-channel `maps` (G, H, W), exactly.

  `map_sizes` (G, 2), optional: the true (height, width) of each map inside its zero
  padding; samples past them clamp to the last real row/column (RoIAlign of the unpadded map).

  Unlike `roi_align`, `sampling_ratio=0` (adaptive, ceil(roi_size / out_size) samples per bin,
  torchvision's and Detectron2's rule) is supported: the count is capped at
  `max_sampling_ratio` (default ceil(size / out_size) per axis, which no box inside the map
  exceeds). Each RoI costs two matmuls with its (out, H) and (out, W) interpolation matrices;
  `chunk` RoIs at a time (lax.map), so at most chunk * H * W floats (and chunk * out * (H + W)
  matrix entries) exist at once.
  """
  out_h, out_w = _pair(output_size)
  maps = jnp.asarray(maps)
  _, h, w = maps.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  x1, y1, roi_w, roi_h = _roi_frame(boxes, spatial_scale, aligned)
  if sampling_ratio > 0:
    grid_h = jnp.full(roi_h.shape, sampling_ratio, jnp.int32)
    grid_w = grid_h
    max_h = max_w = sampling_ratio
  else:
    grid_h = jnp.ceil(_divide(roi_h, out_h)).astype(jnp.int32)
    grid_w = jnp.ceil(_divide(roi_w, out_w)).astype(jnp.int32)
    max_h = max_sampling_ratio or math.ceil(h / out_h)
    max_w = max_sampling_ratio or math.ceil(w / out_w)
    grid_h = jnp.minimum(grid_h, max_h)
    grid_w = jnp.minimum(grid_w, max_w)
  hi = jax.lax.Precision.HIGHEST
  map_index = map_index.astype(jnp.int32)
  if map_sizes is None:
    limit_h = jnp.full(map_index.shape, h, jnp.int32)
    limit_w = jnp.full(map_index.shape, w, jnp.int32)
  else:
    sizes = jnp.asarray(map_sizes, jnp.int32)[map_index]
    limit_h, limit_w = sizes[:, 0], sizes[:, 1]

  def one(args):   # `chunk` RoIs at a time (lax.map vmaps this over the chunk)
    y, rh, gh, lh, x, rw, gw, lw, g = args
    ay = interpolation_matrix(y[None], rh[None], h, out_h, gh[None], max_h, lh[None])[0]
    ax = interpolation_matrix(x[None], rw[None], w, out_w, gw[None], max_w, lw[None])[0]
    m = maps[g].astype(jnp.float32)                                  # ay (out_h, H), ax (out_w, W)
    return jnp.dot(jnp.dot(ay, m, precision=hi), ax.T, precision=hi)

  return jax.lax.map(one, (y1, roi_h, grid_h, limit_h, x1, roi_w, grid_w, limit_w, map_index),
                     batch_size=chunk)
