"""Anchors for every FPN level, as static numpy constants over the padded feature maps.

Detectron2's `DefaultAnchorGenerator` (the default) and torchvision's `AnchorGenerator` (an
option, `AnchorConfig.torchvision()`) place, at every location (x, y) = (j, i) * stride of a
level's feature map, the level's cell anchors: for each size s and aspect ratio r (= h / w) a
box of area s^2 centred at the location's top-left corner (offset 0 in both; Detectron2's
config `MODEL.ANCHOR_GENERATOR.OFFSET = 0.0`). The order is location-major (row by row over
the feature map), anchor-minor, in both libraries, and the RPN head's outputs are flattened
in the same order (`rpn.RPNHead`).

Where the two libraries differ (each an `AnchorConfig` field):

- cell anchors: Detectron2 computes w = sqrt(s^2 / r), h = r * w in float64 and casts the
  corners to float32; torchvision computes w = s / sqrt(r), h = s * sqrt(r) in float32 and
  ROUNDS the corners to integers (`round_base`). Sizes 32..512 with ratios 0.5 / 2 give
  half-widths 22.627 vs 23, for instance.
- strides: Detectron2 uses the level's nominal stride; torchvision derives it from the padded
  image and the feature map as `image_size // grid_size` (`stride_from_grid`). The two agree
  except where the padded size is not a multiple of the nominal stride: with torchvision's
  padding to multiples of 32, P6 (grid ceil(W / 64)) of a 160-wide image has stride
  160 // 3 = 53 in x, not 64.
- with several sizes per level, Detectron2 orders cell anchors size-major, torchvision
  ratio-major (`ratio_major`). With the FPN default of one size per level the two agree.

Anchors are computed once per padded image shape with numpy (they depend on shapes only, so
under `jit` they are compile-time constants); both libraries also cover the padded area of
the feature maps, and so do we.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

Shape = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Which anchors: sizes per level, shared aspect ratios, strides, and the library's rules.

  Attributes:
    sizes: per level, the anchor sizes (sqrt of the area) in input pixels.
    aspect_ratios: height / width of the anchors, the same on every level.
    strides: the nominal stride of each level (P2..P6: 4..64).
    offset: where the first anchor's centre lies, as a fraction of the stride (0 in both).
    round_base: round the cell anchors' corners to integers (torchvision).
    stride_from_grid: stride = padded image size // feature size (torchvision).
    ratio_major: order several sizes per level ratio-major (torchvision).
  """
  sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  strides: tuple[int, ...] = (4, 8, 16, 32, 64)
  offset: float = 0.0
  round_base: bool = False
  stride_from_grid: bool = False
  ratio_major: bool = False

  @classmethod
  def torchvision(cls, **overrides) -> 'AnchorConfig':
    """Returns torchvision's `AnchorGenerator` rules (rounded cells, strides from the grid)."""
    return dataclasses.replace(cls(round_base=True, stride_from_grid=True, ratio_major=True),
                               **overrides)

  @property
  def num_levels(self) -> int:
    return len(self.strides)

  @property
  def num_anchors(self) -> int:
    """Anchors per location (the same on every level, as the shared RPN head needs)."""
    counts = {len(s) * len(self.aspect_ratios) for s in self.sizes}
    if len(counts) != 1:
      raise ValueError(f'every level needs the same number of anchors per location; sizes '
                       f'{self.sizes} with {len(self.aspect_ratios)} ratios give {counts}')
    return counts.pop()


def cell_anchors(config: AnchorConfig) -> list[np.ndarray]:
  """Returns per level the (A, 4) float32 anchors centred at (0, 0)."""
  if len(config.sizes) != config.num_levels:
    raise ValueError(f'{len(config.sizes)} size groups for {config.num_levels} strides')
  out = []
  for sizes in config.sizes:
    if config.round_base:
      # torchvision: float32 arithmetic, w = s / sqrt(r), h = s * sqrt(r), corners rounded
      # (half to even, as torch.round).
      ratios = np.asarray(config.aspect_ratios, np.float32)
      scales = np.asarray(sizes, np.float32)
      h_ratios = np.sqrt(ratios)
      w_ratios = np.float32(1) / h_ratios
      if config.ratio_major:
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
      else:
        ws = (scales[:, None] * w_ratios[None, :]).reshape(-1)
        hs = (scales[:, None] * h_ratios[None, :]).reshape(-1)
      cells = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))
    else:
      # Detectron2: float64 arithmetic, w = sqrt(s^2 / r), h = r * w, then float32.
      pairs = ([(s, r) for r in config.aspect_ratios for s in sizes] if config.ratio_major
               else [(s, r) for s in sizes for r in config.aspect_ratios])
      rows = []
      for s, r in pairs:
        w = math.sqrt(float(s) ** 2.0 / r)
        h = r * w
        rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
      cells = np.asarray(rows, np.float64)
    out.append(cells.astype(np.float32))
  return out


def feature_shapes(image_shape: Shape, strides: Sequence[int] = (4, 8, 16, 32, 64)
                   ) -> list[Shape]:
  """Returns the (H, W) of each level's feature map for a padded `image_shape` (H, W).

  Every stride-2 step of the ResNet-FPN backbone (3x3 conv with padding 1, the stem's max
  pool, 1x1 stride-2 convs, P6's 1x1 stride-2 max pool) maps n to ceil(n / 2), so a level of
  stride 2^k has ceil(n / 2^k) rows and columns.
  """
  shapes = []
  for stride in strides:
    h, w = image_shape
    for _ in range(int(round(math.log2(stride)))):
      h, w = -(-h // 2), -(-w // 2)
    shapes.append((h, w))
  return shapes


def grid_anchors(config: AnchorConfig, shapes: Sequence[Shape],
                 image_shape: Shape | None = None) -> list[np.ndarray]:
  """Returns per level the (H * W * A, 4) float32 anchors, location-major, anchor-minor.

  Args:
    config: the anchor rules.
    shapes: each level's feature map (H, W) (from the features, or `feature_shapes`).
    image_shape: the padded image (H, W); needed only with `config.stride_from_grid`.
  """
  if len(shapes) != config.num_levels:
    raise ValueError(f'{len(shapes)} feature maps for {config.num_levels} anchor levels')
  if config.stride_from_grid and image_shape is None:
    raise ValueError('torchvision-style strides (stride_from_grid) need the padded image_shape')
  out = []
  for (gh, gw), stride, cells in zip(shapes, config.strides, cell_anchors(config)):
    if config.stride_from_grid:
      sy, sx = image_shape[0] // gh, image_shape[1] // gw
    else:
      sy = sx = stride
    # float32 shifts, as Detectron2's `torch.arange(offset * s, n * s, s, dtype=float32)`;
    # torchvision's integer shifts are the same values for offset 0.
    xs = (np.arange(gw, dtype=np.float32) + np.float32(config.offset)) * np.float32(sx)
    ys = (np.arange(gh, dtype=np.float32) + np.float32(config.offset)) * np.float32(sy)
    shift_y, shift_x = np.meshgrid(ys, xs, indexing='ij')
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    out.append((shifts + cells[None]).reshape(-1, 4).astype(np.float32))
  return out


def anchors_for_image(config: AnchorConfig, image_shape: Shape) -> list[np.ndarray]:
  """Returns `grid_anchors` for the ResNet-FPN feature maps of a padded `image_shape`."""
  return grid_anchors(config, feature_shapes(image_shape, config.strides), image_shape)
