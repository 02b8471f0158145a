"""An offline detection dataset: scenes of scikit-learn's handwritten digits, with boxes and masks.

scikit-learn ships 1797 real 8x8 handwritten digits (no download). A scene is a canvas
(96x96 by default) with 1-4 digits, each upsampled bilinearly by a random factor (2x-4x, so
16-32 pixels), drawn in a random bright colour at a random position over a dark background
of random grey with mild Gaussian noise. Ground truth per digit: its class (0-9, so K = 10;
COCO category ids 1-10), its mask (upsampled ink intensity > `ink_threshold`, minus the ink
of digits drawn later over it) and the box tight around that mask (x1 = first ink column,
x2 = last ink column + 1, no "+1" convention). Digits are placed by rejection sampling so
that their ink boxes overlap by at most `max_overlap` IoU (0: disjoint).

The training and held-out scenes draw their digits from disjoint sets of digit images: the
same stratified 75/25 split of the 1797 images as the classification demo (`data.digits`).
Everything is deterministic from `SceneConfig.seed` and the split. The scenes feed
`detection.data`'s pipeline (its `digit_scenes_config()` has the tiny resize/pad settings),
and `DigitScenes.coco()` is their COCO ground truth for `detection.evaluation`.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from reviewkd_jax.data import digits as digits_data
from reviewkd_jax.detection import evaluation

NUM_CLASSES = 10
CATEGORY_IDS = tuple(range(1, NUM_CLASSES + 1))  # COCO-style ids of digits 0..9
CATEGORY_NAMES = tuple(str(d) for d in range(NUM_CLASSES))


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """How the digit scenes are drawn; every field changes the scenes."""
  canvas_size: tuple[int, int] = (96, 96)  # (height, width)
  min_digits: int = 1
  max_digits: int = 4
  min_upsample: float = 2.0  # a digit's side is round(8 * factor) pixels
  max_upsample: float = 4.0
  max_overlap: float = 0.0  # highest IoU allowed between two digits' ink boxes
  noise_std: float = 8.0  # background noise, 0-255 scale
  ink_threshold: float = 0.5  # mask = upsampled intensity (0-1) above this
  num_train: int = 1024
  num_eval: int = 256
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class DigitScenes:
  """The scenes of one split, padded to `max_digits` objects per scene.

  images (N, H, W, 3) uint8; boxes (N, G, 4) float32 x1y1x2y2 pixels; labels (N, G) int32
  digit classes; valid (N, G) bool; masks (N, G, H, W) uint8 0/1; digit_index (N, G) int32
  row of each digit in scikit-learn's dataset (-1 for padding); image_ids (N,) int64 (from 1).
  """
  images: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  valid: np.ndarray
  masks: np.ndarray
  digit_index: np.ndarray
  image_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.image_ids)

  @property
  def orig_sizes(self) -> np.ndarray:
    """Returns the (N, 2) (height, width) of the scenes."""
    return np.tile(np.array(self.images.shape[1:3], np.int32), (len(self), 1))

  def coco(self) -> evaluation.COCO:
    """Returns the scenes' ground truth (boxes and RLE masks) as a pycocotools COCO object."""
    return evaluation.coco_from_arrays(
        self.image_ids, self.orig_sizes, self.boxes, self.labels, self.valid, CATEGORY_IDS,
        masks=self.masks, category_names=CATEGORY_NAMES)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """Returns (images (1797, 8, 8) float32 in [0, 1], labels, {'train'|'eval': row indices})."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  data = load_digits()
  labels = data.target.astype(np.int32)
  rows_train, rows_eval = train_test_split(
      np.arange(len(labels)), test_size=digits_data.TEST_FRACTION, stratify=labels,
      random_state=digits_data.SPLIT_SEED)
  return (data.images.astype(np.float32) / 16.0, labels,
          {'train': np.sort(rows_train), 'eval': np.sort(rows_eval)})


def _resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """Returns a square (size, size) bilinear resize of `image` (half-pixel centres, edges
  clamped: what tf.image.resize / jax.image.resize do when upsampling)."""
  def weights(n_in):
    coord = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    low = np.floor(coord).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    matrix = np.zeros((size, n_in), np.float32)
    np.add.at(matrix, (np.arange(size), low), 1 - (coord - low))
    np.add.at(matrix, (np.arange(size), high), coord - low)
    return matrix
  rows, cols = weights(image.shape[0]), weights(image.shape[1])
  return rows @ image @ cols.T


def _tight_box(mask: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union


def _scene(rng: np.random.Generator, config: SceneConfig, pool: np.ndarray,
           images: np.ndarray, labels: np.ndarray):
  """Returns (image, [(box, label, mask, digit row)]) of one scene."""
  height, width = config.canvas_size
  background = rng.uniform(0, 60)
  canvas = background + rng.normal(0, config.noise_std, (height, width, 1))
  canvas = np.repeat(canvas, 3, axis=-1)
  placed = []  # (ink box, alpha (H, W), label, row)
  for _ in range(rng.integers(config.min_digits, config.max_digits + 1)):
    row = int(rng.choice(pool))
    side = int(round(8 * rng.uniform(config.min_upsample, config.max_upsample)))
    side = min(side, height, width)
    patch = np.clip(_resize_bilinear(images[row], side), 0, 1)
    ink = patch > config.ink_threshold
    if not ink.any():
      continue
    local = _tight_box(ink)
    for _attempt in range(50):
      y0 = int(rng.integers(0, height - side + 1))
      x0 = int(rng.integers(0, width - side + 1))
      box = local + np.array([x0, y0, x0, y0], np.float32)
      if all(_iou(box, other[0]) <= config.max_overlap for other in placed):
        alpha = np.zeros((height, width), np.float32)
        alpha[y0:y0 + side, x0:x0 + side] = patch
        placed.append((box, alpha, int(labels[row]), row))
        break
  objects, covered = [], np.zeros((height, width), bool)
  for box, alpha, label, row in placed:
    colour = rng.uniform(150, 255, 3)
    canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
  for box, alpha, label, row in reversed(placed):  # later digits occlude earlier ones
    mask = (alpha > config.ink_threshold) & ~covered
    covered |= alpha > config.ink_threshold
    if mask.any():
      objects.append((_tight_box(mask), label, mask.astype(np.uint8), row))
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
  return image, objects[::-1]


@functools.cache
def make_scenes(config: SceneConfig = SceneConfig(), split: str = 'train') -> DigitScenes:
  """Returns the scenes of `split` ('train': `num_train` scenes of the training digits,
  'eval': `num_eval` scenes of the held-out digits), deterministic from `config`."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
  if not 1 <= config.min_digits <= config.max_digits:
    raise ValueError('SceneConfig needs 1 <= min_digits <= max_digits.')
  images, labels, pools = _digits()
  count = config.num_train if split == 'train' else config.num_eval
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, split == 'eval']))
  height, width = config.canvas_size
  g = config.max_digits
  out = DigitScenes(
      images=np.zeros((count, height, width, 3), np.uint8),
      boxes=np.zeros((count, g, 4), np.float32), labels=np.zeros((count, g), np.int32),
      valid=np.zeros((count, g), bool), masks=np.zeros((count, g, height, width), np.uint8),
      digit_index=np.full((count, g), -1, np.int32),
      image_ids=np.arange(1, count + 1, dtype=np.int64))
  for i in range(count):
    image, objects = _scene(rng, config, pools[split], images, labels)
    out.images[i] = image
    for j, (box, label, mask, row) in enumerate(objects):
      out.boxes[i, j], out.labels[i, j], out.masks[i, j] = box, label, mask
      out.valid[i, j], out.digit_index[i, j] = True, row
  return out
