"""COCO box and mask AP of fixed-size detections, through pycocotools' COCOeval, over processes.

What Detectron2's `COCOEvaluator` does, for our static-shape outputs:
- `detector_postprocess`: boxes predicted in resized-image pixels go back to the original image
  by the per-axis ratios orig_w / image_w and orig_h / image_h (not the nominal resize factor,
  which rounding makes differ slightly), are clipped to the original image and dropped when
  empty (w or h <= 0). Masks (the (M, M) RoI probabilities of each detection's class) are pasted
  at the original size as Detectron2's `paste_masks_in_image` does (bilinear `grid_sample`,
  `align_corners=False`, zero outside the RoI mask) and thresholded at 0.5.
- `instances_to_coco_json`: xywh boxes, the dataset's category ids, RLE masks
  (`pycocotools.mask.encode`, counts as text); the segm results carry no 'bbox' so that
  COCOeval derives it (and the area) from the mask.
- `evaluate_predictions_on_coco`: COCOeval over exactly the evaluated images
  (`params.imgIds`), AP, AP50, AP75, APs, APm, APl. We report fractions in [0, 1] (Detectron2
  multiplies by 100) and NaN where COCOeval gives -1 (no ground truth), as Detectron2 does.

Where the processes come in: each process adds its own evaluation batches (`CocoEvaluator.add`);
padded examples (`valid=False`) are skipped, so every image is counted once. `gather` then
serialises the process's images and COCO results to bytes and all-gathers them as fixed-size
uint8 arrays (lengths first, then the bytes padded to the longest), by default through
`jax.experimental.multihost_utils.process_allgather` (any callable with its stacking semantics
works: x (...) -> (process_count, ...)). An image id seen twice raises. COCOeval then runs on
the calling process (the trainer calls `evaluate` on every process, because the gather is
collective, and only process 0 pays for COCOeval unless asked otherwise).

Ground truth: the official `instances_val2017.json` (`load_coco`), or a COCO object built in
memory from dicts (`build_coco`) or from padded arrays (`coco_from_arrays`: the digit scenes,
tests, or COCO's boxes read back from tfds when the json is absent).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Callable, Mapping, Sequence

from absl import logging
import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
Allgather = Callable[[np.ndarray], np.ndarray]


def _quiet():
  """pycocotools prints progress on stdout; we keep it out of the training log."""
  return contextlib.redirect_stdout(io.StringIO())


def build_coco(dataset: Mapping) -> COCO:
  """Returns a pycocotools COCO object of an in-memory dataset dict ('images', 'annotations',
  'categories' as in COCO's json); annotation ids must be >= 1 (COCOeval treats 0 as none)."""
  coco = COCO()
  coco.dataset = dict(dataset)
  with _quiet():
    coco.createIndex()
  return coco


def load_coco(path: str) -> COCO:
  """Returns the COCO object of an annotation json (e.g. instances_val2017.json)."""
  with _quiet():
    return COCO(path)


def encode_mask(mask: np.ndarray) -> dict:
  """Returns the compressed RLE of a (H, W) binary mask, counts as text (json-serialisable)."""
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle['counts'] = rle['counts'].decode('ascii')
  return rle


def coco_from_arrays(image_ids: np.ndarray, orig_sizes: np.ndarray, boxes: np.ndarray,
                     labels: np.ndarray, valid: np.ndarray, category_ids: Sequence[int], *,
                     masks: np.ndarray | None = None, is_crowd: np.ndarray | None = None,
                     areas: np.ndarray | None = None,
                     category_names: Sequence[str] | None = None) -> COCO:
  """Returns ground truth as a COCO object built from padded per-image arrays.

  Args:
    image_ids: (N,) image ids.
    orig_sizes: (N, 2) (height, width) of the images.
    boxes: (N, G, 4) x1y1x2y2 in image pixels.
    labels: (N, G) contiguous class ids in [0, K).
    valid: (N, G) which rows are real objects.
    category_ids: the K dataset category ids of the contiguous ids.
    masks: optional (N, G, H, W) binary masks at the image size (segm ground truth; the area
      is then the mask's pixel count, as COCO's).
    is_crowd: optional (N, G) crowd flags.
    areas: optional (N, G) areas (else the mask's pixel count, or the box's area).
    category_names: optional K names.
  """
  names = category_names or [str(c) for c in category_ids]
  images, annotations = [], []
  for i, image_id in enumerate(np.asarray(image_ids).tolist()):
    h, w = (int(v) for v in orig_sizes[i])
    images.append({'id': image_id, 'height': h, 'width': w})
    for g in np.flatnonzero(valid[i]):
      x1, y1, x2, y2 = (float(v) for v in boxes[i, g])
      ann = {'id': len(annotations) + 1, 'image_id': image_id,
             'category_id': int(category_ids[int(labels[i, g])]),
             'bbox': [x1, y1, x2 - x1, y2 - y1],
             'iscrowd': int(is_crowd[i, g]) if is_crowd is not None else 0}
      if masks is not None:
        mask = masks[i, g, :h, :w]
        ann['segmentation'] = encode_mask(mask)
        ann['area'] = float(mask.sum())
      else:
        ann['area'] = (x2 - x1) * (y2 - y1)
      if areas is not None:
        ann['area'] = float(areas[i, g])
      annotations.append(ann)
  categories = [{'id': int(c), 'name': n} for c, n in zip(category_ids, names)]
  return build_coco({'images': images, 'annotations': annotations, 'categories': categories})


def paste_mask(mask: np.ndarray, box: np.ndarray, height: int, width: int,
               threshold: float = 0.5) -> np.ndarray:
  """Returns the (height, width) uint8 mask of an (M, M) RoI mask probability pasted in `box`.

  Detectron2's `paste_masks_in_image` for one box: the pixel centre (x + 0.5) samples the RoI
  mask at u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5 bilinearly, taps outside the mask reading 0
  (`grid_sample`, `align_corners=False`, zero padding), then `>= threshold`.
  """
  m_h, m_w = mask.shape
  x1, y1, x2, y2 = (float(v) for v in box)
  out = np.zeros((height, width), np.uint8)
  c0, c1 = max(math.floor(x1) - 1, 0), min(math.ceil(x2) + 1, width)
  r0, r1 = max(math.floor(y1) - 1, 0), min(math.ceil(y2) + 1, height)
  if c1 <= c0 or r1 <= r0 or x2 <= x1 or y2 <= y1:
    return out
  u = ((np.arange(c0, c1, dtype=np.float32) + 0.5 - x1) / (x2 - x1)) * m_w - 0.5
  v = ((np.arange(r0, r1, dtype=np.float32) + 0.5 - y1) / (y2 - y1)) * m_h - 0.5
  padded = np.pad(mask.astype(np.float32), 1)  # the zero taps outside the mask

  def taps(coord, size):
    low = np.floor(coord)
    frac = (coord - low).astype(np.float32)
    low = low.astype(np.int64)
    # Index into the padded mask (offset 1); taps beyond one pixel outside read 0 as well.
    i0 = np.clip(low + 1, 0, size + 1)
    i1 = np.clip(low + 2, 0, size + 1)
    return i0, i1, frac

  x0i, x1i, fx = taps(u, m_w)
  y0i, y1i, fy = taps(v, m_h)
  top = padded[y0i][:, x0i] * (1 - fx) + padded[y0i][:, x1i] * fx
  bottom = padded[y1i][:, x0i] * (1 - fx) + padded[y1i][:, x1i] * fx
  values = top * (1 - fy)[:, None] + bottom * fy[:, None]
  out[r0:r1, c0:c1] = values >= threshold
  return out


def detections_to_coco(batch: Mapping[str, np.ndarray], detections: Mapping[str, np.ndarray],
                       category_ids: Sequence[int], *, mask_threshold: float = 0.5
                       ) -> tuple[list[int], list[dict]]:
  """Returns (ids of the batch's real images, their COCO result dicts).

  Args:
    batch: the input batch: 'image_id' (B,), 'image_size' (B, 2) resized (h, w), 'orig_size'
      (B, 2), 'valid' (B,) (padded examples are skipped).
    detections: 'boxes' (B, D, 4) x1y1x2y2 in resized-image pixels, 'scores' (B, D), 'classes'
      (B, D) contiguous ids in [0, K), 'valid' (B, D) bool, optionally 'masks' (B, D, M, M)
      mask probabilities of each detection's class (then every result has a 'segmentation').
    category_ids: the dataset category id of each contiguous id.
  """
  get = lambda d, k: np.asarray(d[k])
  image_ids, results = [], []
  for i in np.flatnonzero(get(batch, 'valid')):
    image_id = int(get(batch, 'image_id')[i])
    image_ids.append(image_id)
    h, w = (int(v) for v in get(batch, 'orig_size')[i])
    rh, rw = (int(v) for v in get(batch, 'image_size')[i])
    keep = np.flatnonzero(get(detections, 'valid')[i])
    boxes = get(detections, 'boxes')[i, keep].astype(np.float32)
    boxes = boxes * np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    for j, box in zip(keep[nonempty], boxes[nonempty]):
      x1, y1, x2, y2 = (float(v) for v in box)
      result = {'image_id': image_id,
                'category_id': int(category_ids[int(get(detections, 'classes')[i, j])]),
                'bbox': [x1, y1, x2 - x1, y2 - y1],
                'score': float(get(detections, 'scores')[i, j])}
      if 'masks' in detections:
        pasted = paste_mask(get(detections, 'masks')[i, j], box, h, w, mask_threshold)
        result['segmentation'] = encode_mask(pasted)
      results.append(result)
  return image_ids, results


def gather_payload(payload: object, allgather: Allgather | None = None) -> list:
  """Returns every process's json-serialisable `payload`, in process order (a collective).

  Two fixed-size all-gathers: the byte lengths, then the bytes padded to the longest.
  `allgather` maps an array (...) to the stacked (process_count, ...) arrays of all processes;
  the default is `multihost_utils.process_allgather`, skipped with a single process.
  """
  data = np.frombuffer(json.dumps(payload).encode(), np.uint8)
  if allgather is None:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return [payload]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    allgather = multihost_utils.process_allgather
  lengths = np.asarray(allgather(np.array([len(data)], np.int64))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(allgather(padded))
  return [json.loads(gathered[p, :n].tobytes()) for p, n in enumerate(lengths.tolist())]


def summarize(ground_truth: COCO, results: list[dict], image_ids: Sequence[int],
              iou_type: str = 'bbox') -> dict[str, float]:
  """Returns COCOeval's AP, AP50, AP75, APs, APm, APl (fractions; NaN without ground truth)
  of `results` on exactly `image_ids`; 0 for every metric when there are no results."""
  if not results:
    return {k: 0.0 for k in METRICS}
  if iou_type == 'segm':  # COCOeval takes the box (and area) from the mask (Detectron2)
    results = [{k: v for k, v in r.items() if k != 'bbox'} for r in results]
  with _quiet():
    detections = ground_truth.loadRes(results)
    evaluator = COCOeval(ground_truth, detections, iou_type)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
      evaluator.summarize()
  logging.info('COCO %s evaluation on %d images:\n%s', iou_type, len(image_ids),
               text.getvalue())
  return {k: float('nan') if v < 0 else float(v) for k, v in zip(METRICS, evaluator.stats)}


class CocoEvaluator:
  """Accumulates one process's detections and evaluates all processes' (COCO box/mask AP)."""

  def __init__(self, ground_truth: COCO, category_ids: Sequence[int], *, masks: bool = False,
               mask_threshold: float = 0.5):
    """Args: the ground truth, the dataset category id of each contiguous class id, whether
    to evaluate masks ('segm', needs 'masks' in the detections and segmentations in the
    ground truth) besides boxes, the mask binarisation threshold."""
    if masks and not all('segmentation' in a for a in ground_truth.dataset['annotations']):
      raise ValueError('Mask AP needs ground-truth segmentations: for COCO, the official '
                       'instances_val2017.json (config.annotations_dir).')
    self.ground_truth = ground_truth
    self.category_ids = tuple(int(c) for c in category_ids)
    self.masks = masks
    self.mask_threshold = mask_threshold
    self.reset()

  def reset(self) -> None:
    """Forgets the added detections."""
    self.image_ids: list[int] = []
    self.results: list[dict] = []

  def add(self, batch: Mapping[str, np.ndarray], detections: Mapping[str, np.ndarray]) -> None:
    """Adds this process's detections of one batch (see `detections_to_coco` for the keys)."""
    if self.masks and 'masks' not in detections:
      raise ValueError("CocoEvaluator(masks=True) needs detections['masks'] (B, D, M, M).")
    if not self.masks:
      detections = {k: v for k, v in detections.items() if k != 'masks'}
    ids, results = detections_to_coco(batch, detections, self.category_ids,
                                      mask_threshold=self.mask_threshold)
    self.image_ids += ids
    self.results += results

  def gather(self, allgather: Allgather | None = None) -> tuple[list[int], list[dict]]:
    """Returns (image ids, results) of all processes (a collective: every process calls it).

    Raises ValueError if an image was evaluated twice (by one or several processes).
    """
    parts = gather_payload({'image_ids': self.image_ids, 'results': self.results}, allgather)
    image_ids = [i for part in parts for i in part['image_ids']]
    results = [r for part in parts for r in part['results']]
    if len(set(image_ids)) != len(image_ids):
      seen, twice = set(), set()
      for i in image_ids:
        (twice if i in seen else seen).add(i)
      raise ValueError(f'Images evaluated more than once: {sorted(twice)[:10]}')
    return image_ids, results

  def evaluate(self, allgather: Allgather | None = None, *, process_index: int | None = None,
               all_processes: bool = False) -> dict[str, float] | None:
    """Gathers every process's detections and returns {'bbox/AP': ..., 'segm/AP': ...}.

    Every process must call it (the gather is collective); COCOeval runs on process 0 only
    (others return None) unless `all_processes`. `process_index` defaults to jax's.
    """
    image_ids, results = self.gather(allgather)
    if process_index is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index()
    if process_index != 0 and not all_processes:
      return None
    metrics = {f'bbox/{k}': v for k, v in summarize(
        self.ground_truth, results, image_ids, 'bbox').items()}
    if self.masks:
      metrics.update({f'segm/{k}': v for k, v in summarize(
          self.ground_truth, results, image_ids, 'segm').items()})
    return metrics
