"""Your own detection data: a COCO-format instances json and the folder of its images.

`read_split(annotations, images, ...)` reads one split (an instances json in COCO's format,
as COCO ships it and labelling tools export it) into a `CocoJsonSplit` held in memory like
the digit scenes; `detection.data.CocoJsonSource` feeds it through the pipeline
of COCO and the scenes (`config.dataset = 'coco_json'`, docs/custom.md). Labels: the training
json's category ids sorted, label i (0..K-1) is the i-th; evaluation maps them back, so
results and COCOeval see the json's ids. Masks: polygons, compressed or uncompressed RLE,
rasterised with pycocotools at the image's size when a batch needs them. Crowd regions
(`iscrowd: 1`) are not training targets and are crowd regions in evaluation (COCOeval's).

Everything is checked when a split is read, before any work: the json's structure, each
annotation's image, category, box (inside its image, 1 px of slack) and segmentation, and
every image file (present, decodes, the size the json says). Each kind of mistake stops with
one `CocoJsonError` naming the offending entries or files. Polygons of fewer than 3 points,
which labelling tools leave behind, are dropped with a warning, as Detectron2 drops them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import numbers
from typing import Any, Sequence

from absl import logging
import numpy as np
from pycocotools import mask as mask_util

from reviewkd_jax.data import DatasetNotFoundError
from reviewkd_jax.detection import evaluation
from reviewkd_jax.lazy_imports import tf

BOX_SLACK = 1.0  # pixels a box may reach past its image (then clipped), for rounded corners
DECODED_FORMATS = ('JPEG', 'PNG', 'BMP', 'GIF')  # what tf.io.decode_image reads
_SHOWN = 10


class CocoJsonError(ValueError):
  """A COCO-format dataset that cannot be used as it is; the message names what and where."""


@dataclasses.dataclass(frozen=True)
class CocoJsonSplit:
  """One split: its images sorted by id, their annotations flattened in image order.

  paths (N,) image files; image_ids (N,) int64; sizes (N, 2) int32 (height, width);
  row_splits (N + 1,) int64, annotations row_splits[i]:row_splits[i + 1] are image i's;
  boxes (A, 4) float32 x1y1x2y2 pixels; labels (A,) int32 in [0, K); is_crowd (A,) bool;
  segmentations (A,) the json's segmentation of each annotation (None without one);
  category_ids the K json ids of the labels; ground_truth the split as a COCO dict for
  evaluation (`_ground_truth`; None for a training split).
  """
  annotations: str
  paths: np.ndarray
  image_ids: np.ndarray
  sizes: np.ndarray
  row_splits: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  is_crowd: np.ndarray
  segmentations: tuple
  category_ids: tuple[int, ...]
  ground_truth: dict | None

  def __len__(self) -> int:
    return len(self.image_ids)

  def rows_with_objects(self) -> np.ndarray:
    """Returns the images that have a non-crowd annotation (what training reads)."""
    objects = np.concatenate([[0], np.cumsum(~self.is_crowd)])
    return np.flatnonzero(objects[self.row_splits[1:]] > objects[self.row_splits[:-1]])

  def take(self, rows: np.ndarray) -> 'CocoJsonSplit':
    """Returns the split of the images `rows` (ascending), with their annotations."""
    rows = np.asarray(rows, np.int64)
    parts = [np.arange(self.row_splits[r], self.row_splits[r + 1]) for r in rows]
    keep = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    counts = np.diff(self.row_splits)[rows]
    truth = self.ground_truth
    if truth is not None:
      ids = set(self.image_ids[rows].tolist())
      truth = {**truth, 'images': [i for i in truth['images'] if i['id'] in ids],
               'annotations': [a for a in truth['annotations'] if a['image_id'] in ids]}
    return dataclasses.replace(
        self, paths=self.paths[rows], image_ids=self.image_ids[rows], sizes=self.sizes[rows],
        row_splits=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=self.boxes[keep], labels=self.labels[keep], is_crowd=self.is_crowd[keep],
        segmentations=tuple(self.segmentations[k] for k in keep.tolist()), ground_truth=truth)

  def masks(self, row: int) -> np.ndarray:
    """Returns the (n, H, W) uint8 masks of image `row`'s n annotations, at its size (zeros
    for an annotation without a segmentation)."""
    height, width = (int(v) for v in self.sizes[row])
    start, stop = int(self.row_splits[row]), int(self.row_splits[row + 1])
    out = np.zeros((stop - start, height, width), np.uint8)
    for i in range(start, stop):
      if self.segmentations[i] is not None:
        out[i - start] = mask_util.decode(_rle(self.segmentations[i], height, width))
    return out

  def coco(self) -> evaluation.COCO:
    """Returns the split's ground truth as a pycocotools COCO object (the json's ids)."""
    return evaluation.build_coco(self.ground_truth)


def _rle(segmentation: Any, height: int, width: int) -> dict:
  """Returns the compressed RLE of a COCO segmentation (polygons, or RLE either way)."""
  if isinstance(segmentation, list):
    return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
  if isinstance(segmentation['counts'], list):
    return mask_util.frPyObjects(segmentation, height, width)
  counts = segmentation['counts']
  return {'size': list(segmentation['size']),
          'counts': counts.encode('ascii') if isinstance(counts, str) else counts}


def _listing(items: Sequence[str]) -> str:
  shown = '\n'.join(f'  {item}' for item in items[:_SHOWN])
  more = f'\n  ... and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
  return shown + more


def _join(folder: str, name: str) -> str:
  return name if name.startswith('/') or '://' in name else f'{folder.rstrip("/")}/{name}'


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(
      value)


def _load(path: str) -> dict:
  if not tf.io.gfile.exists(path):
    raise DatasetNotFoundError(f'COCO-format annotation file {path} not found.')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      content = json.loads(f.read())
  except (ValueError, UnicodeDecodeError) as e:
    raise CocoJsonError(f'{path} is not valid JSON ({str(e).splitlines()[0][:120]}): give '
                        'a COCO instances json.') from None
  if not isinstance(content, dict):
    raise CocoJsonError(f'{path} is not a COCO instances json: it holds a '
                        f'{type(content).__name__}, not an object with "images", '
                        '"annotations" and "categories" lists.')
  missing = [k for k in ('images', 'annotations', 'categories')
             if not isinstance(content.get(k), list)]
  if missing:
    has = ', '.join(f'"{k}"' for k in content) or 'nothing'
    raise CocoJsonError(
        f'{path} is not a COCO instances json: no {" and ".join(f"{k!r}" for k in missing)} '
        f'list (it has {has}). A COCO json holds "images" (id, file_name, height, width), '
        '"annotations" (image_id, category_id, bbox, ...) and "categories" (id, name).')
  return content


def _check_entries(path: str, content: dict) -> None:
  """Raises CocoJsonError for entries without the fields COCO requires, or ill-typed ones."""
  bad = []
  for i, image in enumerate(content['images']):
    if not isinstance(image, dict):
      bad.append(f'images[{i}] is not an object')
      continue
    if not _is_int(image.get('id')):
      bad.append(f'images[{i}] has no integer "id"')
    if not isinstance(image.get('file_name'), str) or not image.get('file_name'):
      bad.append(f'images[{i}] has no "file_name"')
    for key in ('height', 'width'):
      if key in image and not (_is_int(image[key]) and image[key] > 0):
        bad.append(f'images[{i}] "{key}" is {image[key]!r}, not a positive integer')
  for i, category in enumerate(content['categories']):
    if not isinstance(category, dict) or not _is_int(category.get('id')):
      bad.append(f'categories[{i}] has no integer "id"')
  for i, ann in enumerate(content['annotations']):
    if not isinstance(ann, dict):
      bad.append(f'annotations[{i}] is not an object')
      continue
    for key in ('image_id', 'category_id'):
      if not _is_int(ann.get(key)):
        bad.append(f'annotations[{i}] has no integer "{key}"')
    box = ann.get('bbox')
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
      bad.append(f'annotations[{i}] "bbox" is {box!r}, not [x, y, width, height]')
    elif box[2] < 0 or box[3] < 0:
      bad.append(f'annotations[{i}] "bbox" {box} has a negative width or height')
    if ann.get('iscrowd', 0) not in (0, 1):
      bad.append(f'annotations[{i}] "iscrowd" is {ann["iscrowd"]!r}, not 0 or 1')
  if bad:
    raise CocoJsonError(f'{path} is not a COCO instances json: {len(bad)} entries lack what '
                        f'COCO requires:\n{_listing(bad)}')
  for key, what in (('images', 'image'), ('categories', 'category')):
    ids = [entry['id'] for entry in content[key]]
    if len(set(ids)) < len(ids):
      seen, twice = set(), set()
      for i in ids:
        (twice if i in seen else seen).add(i)
      raise CocoJsonError(f'{path}: {what} ids {sorted(twice)[:_SHOWN]} appear more than '
                          f'once in "{key}"; each needs its own id.')


def _segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
  """Returns why `segmentation` is not a COCO segmentation of an image of that size."""
  if isinstance(segmentation, list):
    if not segmentation:
      return 'an empty polygon list'
    for polygon in segmentation:
      if not (isinstance(polygon, list) and all(_is_number(v) for v in polygon)):
        return 'a polygon that is not a list of numbers [x1, y1, x2, y2, ...]'
    return None
  if isinstance(segmentation, dict) and 'counts' in segmentation and 'size' in segmentation:
    size, counts = segmentation['size'], segmentation['counts']
    if list(size) != [height, width]:
      return f'an RLE of size {list(size)}, but the image is [{height}, {width}] (h, w)'
    if isinstance(counts, list):
      if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
        return (f'an uncompressed RLE whose counts do not sum to {height} * {width} '
                f'(they sum to {sum(c for c in counts if _is_number(c))})')
      return None
    if isinstance(counts, str):
      return None
    return 'an RLE whose "counts" is neither a list nor a string'
  return 'neither polygons nor an RLE ({"size", "counts"})'


def _inspect(path: str) -> tuple[str | None, tuple[int, int] | None]:
  """Returns (why `path` cannot be read as an image or None, its (height, width))."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      contents = f.read()
    with Image.open(io.BytesIO(contents)) as image:
      size, kind = (image.height, image.width), image.format
      image.verify()
  except UnidentifiedImageError:
    return f'not an image format PIL knows ({len(contents)} bytes)', None
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}', None
  if kind not in DECODED_FORMATS:
    return f'{kind} images are not read by the pipeline (convert to PNG or JPEG)', None
  return None, size


def read_split(annotations: str, images: str, *, category_ids: Sequence[int] | None = None,
               masks: bool = False, evaluation: bool = False) -> CocoJsonSplit:
  """Returns one split read from the instances json `annotations` and the folder `images`.

  Args:
    annotations: the json's path (`tf.io.gfile`: local or gs://).
    images: the folder that `file_name` is relative to.
    category_ids: the label order (the training split's); None: this json's categories,
      sorted by id.
    masks: whether every annotation must have a segmentation (mask targets, mask AP).
    evaluation: whether the split is evaluated (then `ground_truth` is built; else None).

  Raises DatasetNotFoundError (the json or the folder is missing) or CocoJsonError.
  """
  what = 'evaluation' if evaluation else 'training'
  if not tf.io.gfile.isdir(images):
    raise DatasetNotFoundError(f'The image folder {images} of the {what} annotations '
                               f'{annotations} does not exist.')
  content = _load(annotations)
  _check_entries(annotations, content)
  own = sorted(c['id'] for c in content['categories'])
  if category_ids is None:
    if not own:
      raise CocoJsonError(f'{annotations}: "categories" is empty; list the classes as '
                          '{"id": ..., "name": ...}.')
    category_ids = own
  label_of = {c: i for i, c in enumerate(category_ids)}
  images_by_id = {image['id']: image for image in content['images']}
  if not images_by_id:
    raise CocoJsonError(f'{annotations}: "images" is empty; the {what} split needs images.')

  # Annotations that name no image or no category.
  orphans = [f'annotations[{i}] image_id {a["image_id"]}'
             for i, a in enumerate(content['annotations']) if a['image_id'] not in images_by_id]
  if orphans:
    raise CocoJsonError(f'{annotations}: {len(orphans)} annotation(s) refer to an image_id '
                        f'that no entry of "images" has:\n{_listing(orphans)}')
  listed = set(own)
  unknown = [(i, a) for i, a in enumerate(content['annotations'])
             if a['category_id'] not in listed or a['category_id'] not in label_of]
  if unknown:
    ids = sorted({a['category_id'] for _, a in unknown})
    own_list = any(a['category_id'] not in listed for _, a in unknown)
    where = 'the categories list' if own_list else "the training json's categories list"
    known = sorted(listed if own_list else label_of)
    raise CocoJsonError(
        f'{annotations}: {len(unknown)} annotation(s) have a category_id missing from '
        f'{where} (ids {ids[:_SHOWN]}; listed: {known[:20]}{", ..." * (len(known) > 20)}):\n'
        + _listing([f'annotations[{i}] (image_id {a["image_id"]}) category_id '
                    f'{a["category_id"]}' for i, a in unknown])
        + '\nAdd those categories or remove the annotations.')

  # The image files: present, decodable, the size the json says.
  order = sorted(images_by_id)
  paths = [_join(images, images_by_id[i]['file_name']) for i in order]
  missing = [p for p in paths if not tf.io.gfile.exists(p)]
  if missing:
    raise CocoJsonError(f'{annotations}: {len(missing)} image file(s) listed in the json are '
                        f'missing from {images}:\n{_listing(missing)}')
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    inspected = list(pool.map(_inspect, paths))
  broken = [f'{p}: {why}' for p, (why, _) in zip(paths, inspected) if why is not None]
  if broken:
    raise CocoJsonError(f'{annotations}: {len(broken)} image file(s) do not decode as '
                        f'images:\n{_listing(broken)}\nRemove or replace them.')
  sizes = np.array([size for _, size in inspected], np.int32).reshape(-1, 2)
  wrong = []
  for image_id, path, (h, w) in zip(order, paths, sizes.tolist()):
    entry = images_by_id[image_id]
    if (entry.get('height', h), entry.get('width', w)) != (h, w):
      wrong.append(f'{path}: {w}x{h} pixels, the json says {entry.get("width")}x'
                   f'{entry.get("height")} (image id {image_id})')
  if wrong:
    raise CocoJsonError(f'{annotations}: {len(wrong)} image(s) are not the size the json '
                        f'gives (width x height):\n{_listing(wrong)}\nFix "width"/"height" or '
                        'the files (EXIF orientation is not applied: sizes are as stored).')
  size_of = dict(zip(order, sizes.tolist()))

  # Boxes inside their images; segmentations well formed. Polygons of fewer than 3 points
  # (labelling tools' artefacts) are dropped as Detectron2 drops them; with masks, so is an
  # annotation left without a polygon.
  problems = {'box': [], 'segmentation': []}
  degenerate, emptied = [], []
  for i, ann in enumerate(content['annotations']):
    h, w = size_of[ann['image_id']]
    x, y, bw, bh = ann['bbox']
    name = f'annotations[{i}] (image_id {ann["image_id"]}, {w}x{h})'
    if (x < -BOX_SLACK or y < -BOX_SLACK or x + bw > w + BOX_SLACK
        or y + bh > h + BOX_SLACK):
      problems['box'].append(f'{name} bbox {ann["bbox"]}')
    segmentation = ann.get('segmentation')
    if segmentation is None or segmentation == []:
      if masks:
        problems['segmentation'].append(f'{name} has no segmentation')
    else:
      why = _segmentation_problem(segmentation, h, w)
      if why:
        problems['segmentation'].append(f'{name} has {why}')
      elif isinstance(segmentation, list):
        kept = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if len(kept) < len(segmentation):
          degenerate.append(f'annotations[{i}]')
          ann['segmentation'] = kept or None
          if not kept:
            emptied.append(i)
  dropped = set(emptied) if masks else set()
  if degenerate:
    logging.warning(
        '%s: %d annotation(s) have polygons of fewer than 3 points (or an odd number of '
        'coordinates), which are dropped (%s%s); %d have no other polygon and are %s.',
        annotations, len(degenerate), ', '.join(degenerate[:_SHOWN]),
        ', ...' if len(degenerate) > _SHOWN else '', len(emptied),
        'left out (masks need one)' if masks else 'kept for their boxes')
  if problems['box']:
    raise CocoJsonError(
        f'{annotations}: {len(problems["box"])} annotation box(es) [x, y, width, height] '
        f'reach outside their image (more than {BOX_SLACK:g} px):\n'
        f'{_listing(problems["box"])}\nFix or remove them.')
  if problems['segmentation']:
    hint = (' Masks (config.mask) need a segmentation for every annotation.'
            if masks else '')
    raise CocoJsonError(
        f'{annotations}: {len(problems["segmentation"])} annotation(s) have no usable '
        f'segmentation:\n{_listing(problems["segmentation"])}\nA segmentation is a list of '
        'polygons [x1, y1, x2, y2, ...] or an RLE {"size": [h, w], "counts": ...}.' + hint)

  # The arrays, in image-id order.
  by_image: dict[int, list] = {i: [] for i in order}
  for i, ann in enumerate(content['annotations']):
    if i not in dropped:
      by_image[ann['image_id']].append(ann)
  flat = [a for i in order for a in by_image[i]]
  boxes = np.array([a['bbox'] for a in flat], np.float32).reshape(-1, 4)
  boxes[:, 2:] += boxes[:, :2]
  ground_truth = None
  if evaluation:
    ground_truth = _ground_truth(content, flat, order, images_by_id, size_of)
  return CocoJsonSplit(
      annotations=annotations, paths=np.asarray(paths), image_ids=np.asarray(order, np.int64),
      sizes=sizes,
      row_splits=np.concatenate([[0], np.cumsum([len(by_image[i]) for i in order])]).astype(
          np.int64),
      boxes=boxes, labels=np.array([label_of[a['category_id']] for a in flat], np.int32),
      is_crowd=np.array([bool(a.get('iscrowd', 0)) for a in flat], bool),
      segmentations=tuple(a.get('segmentation') or None for a in flat),
      category_ids=tuple(int(c) for c in category_ids), ground_truth=ground_truth)


def _ground_truth(content: dict, flat: list, order: list, images_by_id: dict,
                  size_of: dict) -> dict:
  """Returns the COCO dict COCOeval reads: every annotation with 'iscrowd' and 'area' (the
  json's, else the segmentation's pixel count, else the box's), ids renumbered from 1 (the
  json's may start at 0, which COCOeval takes for "no match")."""
  names = {c['id']: str(c.get('name', c['id'])) for c in content['categories']}
  truth_annotations = []
  for k, ann in enumerate(flat):
    h, w = size_of[ann['image_id']]
    entry = {'id': k + 1, 'image_id': ann['image_id'], 'category_id': ann['category_id'],
             'bbox': [float(v) for v in ann['bbox']], 'iscrowd': int(ann.get('iscrowd', 0))}
    segmentation = ann.get('segmentation')
    if segmentation not in (None, []):
      entry['segmentation'] = segmentation
    if _is_number(ann.get('area')):
      entry['area'] = float(ann['area'])
    elif 'segmentation' in entry:
      entry['area'] = float(mask_util.area(_rle(segmentation, h, w)))
    else:
      entry['area'] = float(ann['bbox'][2] * ann['bbox'][3])
    truth_annotations.append(entry)
  return {
      'images': [{'id': i, 'file_name': images_by_id[i]['file_name'], 'height': size_of[i][0],
                  'width': size_of[i][1]} for i in order],
      'annotations': truth_annotations,
      'categories': [{'id': c['id'], 'name': names[c['id']]} for c in content['categories']]}
