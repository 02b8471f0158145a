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


def _crop_bounds(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns the [start, stop) pixels pasted for boxes spanning [lo, hi] on an axis of `size`:
  one pixel beyond the box's integer hull on each side, inside the image (Detectron2's CPU
  `paste_masks_in_image`, `skip_empty=True`)."""
  start = np.maximum(np.floor(lo).astype(np.int64) - 1, 0)
  stop = np.minimum(np.ceil(hi).astype(np.int64) + 1, size)
  return start, stop


def _taps(coord: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns the two bilinear taps' indices into the zero-padded mask and the weight of the
  second, for sample coordinates `coord` over a mask axis of `size` (taps outside read 0)."""
  low = np.floor(coord)
  frac = (coord - low).astype(np.float32)
  low = low.astype(np.int64)
  return np.clip(low + 1, 0, size + 1), np.clip(low + 2, 0, size + 1), frac


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                threshold: float = 0.5, *, max_elements: int = 1 << 22) -> np.ndarray:
  """Returns the (N, height, width) uint8 masks of N (M, M) RoI mask probabilities pasted in
  their (N, 4) x1y1x2y2 boxes (image pixels), all at once.

  Detectron2's `paste_masks_in_image` as it runs on the CPU: the pixel centre (x + 0.5)
  samples the RoI mask at u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5 bilinearly, taps outside
  the mask reading 0 (`grid_sample`, `align_corners=False`, zero padding), over the box's
  integer hull and one pixel beyond it (0 elsewhere), then `>= threshold`. An empty box
  (x2 <= x1 or y2 <= y1) pastes nothing. The float32 arithmetic is the one-box rule's,
  operation for operation, so pasting box by box gives the same pixels
  (tests/test_detection_data.py keeps that rule as the reference); here the boxes are
  processed together, in groups of similar extent whose windows hold at most about
  `max_elements` values.
  """
  masks = np.asarray(masks, np.float32)
  exact = np.asarray(boxes, np.float64).reshape(-1, 4)   # the box as given decides the crop
  n = exact.shape[0]
  out = np.zeros((n, height, width), np.uint8)
  if n == 0:
    return out
  m_h, m_w = masks.shape[-2:]
  c0, c1 = _crop_bounds(exact[:, 0], exact[:, 2], width)
  r0, r1 = _crop_bounds(exact[:, 1], exact[:, 3], height)
  live = np.flatnonzero((c1 > c0) & (r1 > r0) & (exact[:, 2] > exact[:, 0])
                        & (exact[:, 3] > exact[:, 1]))
  if live.size == 0:
    return out
  # The sample coordinates in float32: the corner rounded to float32, the side a float64
  # difference rounded to float32.
  x1, y1 = exact[:, 0].astype(np.float32), exact[:, 1].astype(np.float32)
  box_w = (exact[:, 2] - exact[:, 0]).astype(np.float32)
  box_h = (exact[:, 3] - exact[:, 1]).astype(np.float32)
  padded = np.pad(masks.reshape(n, m_h, m_w), ((0, 0), (1, 1), (1, 1)))
  rows_needed, cols_needed = r1 - r0, c1 - c0
  live = live[np.argsort(rows_needed[live] * cols_needed[live], kind='stable')]
  begin = 0
  while begin < live.size:
    # The next group: as many boxes (by increasing extent) as fit the element budget.
    end = begin + 1
    h_win, w_win = rows_needed[live[begin]], cols_needed[live[begin]]
    while end < live.size:
      h_next = max(h_win, rows_needed[live[end]])
      w_next = max(w_win, cols_needed[live[end]])
      if (end + 1 - begin) * h_next * w_next > max_elements:
        break
      h_win, w_win, end = h_next, w_next, end + 1
    idx = live[begin:end]
    begin = end
    # Windows of h_win x w_win pixels inside the image, each covering its box's crop.
    top = np.minimum(r0[idx], height - h_win)
    left = np.minimum(c0[idx], width - w_win)
    rows = top[:, None] + np.arange(h_win)                                   # (g, h_win)
    cols = left[:, None] + np.arange(w_win)                                  # (g, w_win)
    u = ((cols.astype(np.float32) + np.float32(0.5) - x1[idx, None]) / box_w[idx, None]
         * np.float32(m_w) - np.float32(0.5))
    v = ((rows.astype(np.float32) + np.float32(0.5) - y1[idx, None]) / box_h[idx, None]
         * np.float32(m_h) - np.float32(0.5))
    x0i, x1i, fx = _taps(u, m_w)
    y0i, y1i, fy = _taps(v, m_h)
    g = np.arange(idx.size)[:, None, None]
    rows_of = padded[idx]                                                    # (g, M+2, M+2)
    # Along x first, then y: the operations (and so the rounding) of the one-box rule.
    along_x = (np.take_along_axis(rows_of, np.broadcast_to(x0i[:, None, :], (
        idx.size, m_h + 2, w_win)), axis=2) * (1 - fx)[:, None, :]
               + np.take_along_axis(rows_of, np.broadcast_to(x1i[:, None, :], (
                   idx.size, m_h + 2, w_win)), axis=2) * fx[:, None, :])  # (g, M+2, w_win)
    values = (along_x[g, y0i[:, :, None], np.arange(w_win)[None, None, :]]
              * (1 - fy)[:, :, None]
              + along_x[g, y1i[:, :, None], np.arange(w_win)[None, None, :]]
              * fy[:, :, None])                                               # (g, h_win, w_win)
    inside = (((rows >= r0[idx, None]) & (rows < r1[idx, None]))[:, :, None]
              & ((cols >= c0[idx, None]) & (cols < c1[idx, None]))[:, None, :])
    out[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = (
        (values >= threshold) & inside)
  return out


def paste_mask(mask: np.ndarray, box: np.ndarray, height: int, width: int,
               threshold: float = 0.5) -> np.ndarray:
  """Returns the (height, width) uint8 mask of an (M, M) RoI mask probability pasted in `box`
  (`paste_masks` for one box)."""
  return paste_masks(np.asarray(mask)[None], np.asarray(box)[None], height, width,
                     threshold)[0]


def encode_masks(masks: np.ndarray) -> list[dict]:
  """Returns the compressed RLEs of (N, H, W) binary masks (`encode_mask` of each, in one
  pycocotools call)."""
  if len(masks) == 0:
    return []
  rles = mask_util.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
  for rle in rles:
    rle['counts'] = rle['counts'].decode('ascii')
  return rles


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
  all_boxes, all_scores = get(detections, 'boxes'), get(detections, 'scores')
  all_classes, all_valid = get(detections, 'classes'), get(detections, 'valid')
  all_masks = get(detections, 'masks') if 'masks' in detections else None
  ids, orig, resized = get(batch, 'image_id'), get(batch, 'orig_size'), get(batch, 'image_size')
  category_ids = np.asarray(category_ids)
  image_ids, results = [], []
  for i in np.flatnonzero(get(batch, 'valid')):
    image_id = int(ids[i])
    image_ids.append(image_id)
    h, w = (int(v) for v in orig[i])
    rh, rw = (int(v) for v in resized[i])
    keep = np.flatnonzero(all_valid[i])
    boxes = all_boxes[i, keep].astype(np.float32)
    boxes = boxes * np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep, boxes = keep[nonempty], boxes[nonempty]
    x1, y1, x2, y2 = (boxes[:, k].astype(np.float64) for k in range(4))
    xywh = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).tolist()
    categories = category_ids[all_classes[i, keep]].tolist()
    scores = all_scores[i, keep].astype(np.float64).tolist()
    rles = (encode_masks(paste_masks(all_masks[i, keep], boxes, h, w, mask_threshold))
            if all_masks is not None else None)
    for j in range(len(keep)):
      result = {'image_id': image_id, 'category_id': categories[j], 'bbox': xywh[j],
                'score': scores[j]}
      if rles is not None:
        result['segmentation'] = rles[j]
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
