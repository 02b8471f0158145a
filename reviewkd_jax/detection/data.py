"""Detection input pipelines, per process: COCO 2017 from tfds, the offline digit scenes, and a
user's own COCO-format json and images (`coco_json.py`).

`create_detection_pipeline(config)` returns batches of numpy arrays in the detector's
contract: 'image' (B, H_pad, W_pad, 3) float32 RGB 0-255 at the top left of a zero canvas,
'image_size' and 'orig_size' (B, 2), 'scale', 'image_id', ground truth 'boxes' (B, G, 4)
x1y1x2y2 in resized pixels, 'labels' (contiguous ids), 'gt_valid', 'masks' (training, with
masks) and 'valid' (False for the padding of the last evaluation batch). Augmentation is
Detectron2's defaults; `train_batches(start_step)` resumes exactly. The batch format field
by field, the augmentation, the per-process determinism and the COCO masks: docs/detection.md,
"Module notes".
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import threading
from typing import Iterator, Mapping

from absl import logging
import numpy as np

from reviewkd_jax.data import DatasetNotFoundError
from reviewkd_jax.data.shares import derive_seed, process_share, tfds_data_dir
from reviewkd_jax.detection import coco_json, evaluation, scenes
from reviewkd_jax.lazy_imports import tf, tfds

Batch = dict[str, np.ndarray]

# COCO's category ids of tfds's contiguous labels 0..79 (tfds numbers the categories in the
# json's order, which is by id; Detectron2's contiguous ids are the same).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90)
ANNOTATIONS_URL = 'http://images.cocodataset.org/annotations/annotations_trainval2017.zip'
_COCO_JSON = {'train': 'instances_train2017.json', 'validation': 'instances_val2017.json'}
BOX_THRESHOLD = 1e-5  # Detectron2's filter_empty_instances


class DetectionDataNotFoundError(DatasetNotFoundError):
  """A detection dataset or annotation file is missing; the message says what to download."""


@dataclasses.dataclass(frozen=True)
class DetectionDataConfig:
  """Where the data is and how it is resized, padded and batched (Detectron2's defaults).

  `batch_size` and `eval_batch_size` are global (over all processes). `train_subset` /
  `eval_subset` > 0 keep the first that many images of the split (quick runs).
  `annotations_dir` holds instances_{train,val}2017.json (masks, and the official ground
  truth for evaluation); empty means `<data_dir>/annotations`, then the annotation zip tfds
  extracted under `<data_dir>/downloads/extracted`. `dataset='coco_json'` reads your own
  COCO-format data instead (`coco_json.py`): `train_annotations`/`eval_annotations` are the
  instances jsons, `train_images`/`eval_images` the folders their `file_name`s are in.
  """
  dataset: str = 'coco/2017'  # or 'digit_scenes', 'coco_json'
  data_dir: str = ''
  annotations_dir: str = ''
  train_annotations: str = ''  # 'coco_json': the instances jsons and their image folders
  train_images: str = ''
  eval_annotations: str = ''
  eval_images: str = ''  # '' = train_images
  train_split: str = 'train'
  eval_split: str = 'validation'
  train_min_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
  train_max_size: int = 1333
  test_min_size: int = 800
  test_max_size: int = 1333
  pad_size: tuple[int, int] = (1344, 1344)
  max_boxes: int = 100
  random_flip: bool = True
  masks: bool = False
  batch_size: int = 16
  eval_batch_size: int = 8
  seed: int = 0
  shuffle_buffer: int = 1024
  filter_empty: bool = True
  train_subset: int = 0
  eval_subset: int = 0
  scenes: scenes.SceneConfig = scenes.SceneConfig()

  @classmethod
  def from_config(cls, config: Mapping | object, **overrides) -> 'DetectionDataConfig':
    """Returns the fields that `config` (a mapping or ConfigDict) has, defaults elsewhere;
    sequences become tuples."""
    values = {}
    for field in dataclasses.fields(cls):
      if isinstance(config, Mapping):
        present, value = field.name in config, config.get(field.name)
      else:
        present, value = hasattr(config, field.name), getattr(config, field.name, None)
      if present:
        values[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    if 'scenes' in values and not isinstance(values['scenes'], scenes.SceneConfig):
      nested = values['scenes']
      names = [f.name for f in dataclasses.fields(scenes.SceneConfig)]
      values['scenes'] = scenes.SceneConfig(**{
          k: tuple(nested[k]) if isinstance(nested[k], (list, tuple)) else nested[k]
          for k in names if k in nested})
    values.update(overrides)
    return cls(**values)


def digit_scenes_config(**overrides) -> DetectionDataConfig:
  """Returns the tiny settings of the digit scenes: 96x96 canvases resized to a shorter side
  of 96-128 (training) / 128 (evaluation), padded to 128x128, at most 4 objects, no flip
  (mirrored digits are not digits), masks on."""
  values = dict(dataset='digit_scenes', train_min_sizes=(96, 112, 128), train_max_size=128,
                test_min_size=128, test_max_size=128, pad_size=(128, 128), max_boxes=4,
                random_flip=False, masks=True, batch_size=16, eval_batch_size=16,
                shuffle_buffer=0)
  values.update(overrides)
  return DetectionDataConfig(**values)


def resized_shape(height: int, width: int, short_edge: int, max_size: int
                  ) -> tuple[int, int, float]:
  """Returns Detectron2's ResizeShortestEdge output (new_h, new_w) and the factor applied."""
  scale = short_edge / min(height, width)
  if height < width:
    new_h, new_w = float(short_edge), scale * width
  else:
    new_h, new_w = scale * height, float(short_edge)
  if max(new_h, new_w) > max_size:
    factor = max_size / max(new_h, new_w)
    new_h, new_w, scale = new_h * factor, new_w * factor, scale * factor
  return int(new_h + 0.5), int(new_w + 0.5), scale


def _resized_shape_tf(height, width, short_edge, max_size):
  """`resized_shape` in TensorFlow (float64, as Detectron2's Python floats)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  size = tf.cast(short_edge, tf.float64)
  scale = size / tf.minimum(h, w)
  new_h = tf.where(h < w, size, scale * h)
  new_w = tf.where(h < w, scale * w, size)
  longest = tf.maximum(new_h, new_w)
  factor = tf.where(longest > max_size, tf.constant(max_size, tf.float64) / longest, 1.0)
  new_h, new_w, scale = new_h * factor, new_w * factor, scale * factor
  return (tf.cast(new_h + 0.5, tf.int32), tf.cast(new_w + 0.5, tf.int32),
          tf.cast(scale, tf.float32))


def _transform(example: dict, seed, config: DetectionDataConfig, *, train: bool) -> dict:
  """Returns the batch element of a raw example: resized, maybe flipped, padded, G objects.

  A raw example has 'image' uint8 (h, w, 3), 'image_id' int64, 'boxes' (N, 4) float32
  x1y1x2y2 in original pixels, 'labels' (N,) int32, 'is_crowd' (N,) bool and, with masks,
  'masks' (N, h, w) uint8.
  """
  image = example['image']
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  size_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if train:
    sizes = tf.constant(config.train_min_sizes, tf.int32)
    short = tf.gather(sizes, tf.random.stateless_uniform(
        [], size_seed, 0, len(config.train_min_sizes), dtype=tf.int32))
    max_size = config.train_max_size
  else:
    short, max_size = tf.constant(config.test_min_size, tf.int32), config.test_max_size
  new_h, new_w, scale = _resized_shape_tf(height, width, short, max_size)
  pad_h, pad_w = config.pad_size
  with tf.control_dependencies([tf.debugging.assert_less_equal(
      tf.stack([new_h, new_w]), tf.constant([pad_h, pad_w]),
      message=f'A resized image is larger than pad_size={config.pad_size}: raise pad_size '
              'or lower the resize sizes.')]):
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                              method='bilinear', antialias=True)
  resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
  ratio = tf.stack([tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32),
                    tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)])
  boxes = tf.reshape(example['boxes'], [-1, 4]) * tf.tile(ratio, [2])
  masks = None
  if config.masks and train:
    masks = tf.transpose(tf.cast(example['masks'], tf.float32), [1, 2, 0])
    masks = tf.concat([masks, tf.zeros_like(masks[..., :1])], -1)  # resize wants >= 1 channel
    masks = tf.image.resize(masks, tf.stack([new_h, new_w]), method='bilinear')[..., :-1]
    masks = tf.transpose(tf.cast(masks >= 0.5, tf.uint8), [2, 0, 1])
  if train and config.random_flip:
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    w = tf.cast(new_w, tf.float32)
    flipped = tf.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], -1)
    boxes = tf.where(flip, flipped, boxes)
    resized = tf.cond(flip, lambda: resized[:, ::-1], lambda: resized)
    if masks is not None:
      masks = tf.cond(flip, lambda: masks[:, :, ::-1], lambda: masks)
  limit = tf.cast(tf.stack([new_w, new_h, new_w, new_h]), tf.float32)
  boxes = tf.clip_by_value(boxes, 0.0, limit)
  keep = ((boxes[:, 2] - boxes[:, 0] > BOX_THRESHOLD)
          & (boxes[:, 3] - boxes[:, 1] > BOX_THRESHOLD) & ~example['is_crowd'])
  if masks is not None:
    keep &= tf.reduce_any(masks > 0, axis=[1, 2])
  index = tf.where(keep)[:, 0]
  num_boxes = tf.size(index)
  index = index[:config.max_boxes]
  pad = config.max_boxes - tf.size(index)
  out = {
      'image': tf.ensure_shape(tf.pad(resized, [[0, pad_h - new_h], [0, pad_w - new_w],
                                                [0, 0]]), [pad_h, pad_w, 3]),
      'image_size': tf.stack([new_h, new_w]),
      'scale': scale,
      'orig_size': tf.stack([height, width]),
      'image_id': tf.cast(example['image_id'], tf.int64),
      'boxes': tf.ensure_shape(tf.pad(tf.gather(boxes, index), [[0, pad], [0, 0]]),
                               [config.max_boxes, 4]),
      'labels': tf.ensure_shape(tf.pad(tf.gather(example['labels'], index), [[0, pad]]),
                                [config.max_boxes]),
      'gt_valid': tf.ensure_shape(tf.range(config.max_boxes) < tf.size(index),
                                  [config.max_boxes]),
      'valid': tf.constant(True),
      '_num_boxes': num_boxes,
  }
  if masks is not None:
    out['masks'] = tf.ensure_shape(tf.pad(
        tf.gather(masks, index), [[0, pad], [0, pad_h - new_h], [0, pad_w - new_w]]),
        [config.max_boxes, pad_h, pad_w])
  return out


def _padding_example(config: DetectionDataConfig) -> dict:
  """The evaluation padding: a black image of the padded size, no objects, valid=False."""
  pad_h, pad_w = config.pad_size
  g = config.max_boxes
  return {'image': tf.zeros([pad_h, pad_w, 3], tf.float32),
          'image_size': tf.constant([pad_h, pad_w], tf.int32),
          'scale': tf.constant(1.0), 'orig_size': tf.constant([pad_h, pad_w], tf.int32),
          'image_id': tf.constant(-1, tf.int64), 'boxes': tf.zeros([g, 4], tf.float32),
          'labels': tf.zeros([g], tf.int32), 'gt_valid': tf.zeros([g], tf.bool),
          'valid': tf.constant(False), '_num_boxes': tf.constant(0, tf.int32)}


def _shuffled_rows(num: int, seed: int, start_step: int, what: str, *, local_batch: int,
                   global_batch: int, process_index: int) -> tf.data.Dataset:
  """Returns this process's endless (global position, row) pairs over `num` in-memory
  examples from step `start_step` on: epochs of num // global_batch steps (the remainder
  dropped), position k of epoch e holds row index_shuffle(k, (seed, e)), and the process
  takes its consecutive rows of each global batch."""
  steps_per_epoch = num // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{num} {what} are fewer than one global batch of {global_batch}.')
  offset = process_index * local_batch

  def pair(i):
    step = start_step + i // local_batch
    epoch, in_epoch = step // steps_per_epoch, step % steps_per_epoch
    k = in_epoch * global_batch + offset + i % local_batch
    row = tf.random.experimental.index_shuffle(
        k, tf.stack([tf.constant(seed, tf.int64), epoch]), num - 1)
    return step * global_batch + offset + i % local_batch, row

  return tf.data.Dataset.range(2 ** 62).map(pair, num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)


_warned = set()


def _strip(batches: Iterator[Batch], max_boxes: int) -> Iterator[Batch]:
  """Yields the batches without the internal '_num_boxes', warning once about truncation."""
  for batch in batches:
    counts = batch.pop('_num_boxes')
    if counts.max() > max_boxes and 'max_boxes' not in _warned:
      _warned.add('max_boxes')
      logging.warning('An image has %d objects, more than max_boxes=%d: only the first %d '
                      'are kept (warned once).', counts.max(), max_boxes, max_boxes)
    yield batch


class DetectionPipeline:
  """Per-process training and evaluation batches (numpy, the format above) of one source."""

  def __init__(self, config: DetectionDataConfig, source, *, process_index: int = 0,
               process_count: int = 1):
    for name in ('batch_size', 'eval_batch_size'):
      if getattr(config, name) % process_count:
        raise ValueError(f'{name}={getattr(config, name)} must be divisible by the number of '
                         f'processes ({process_count}); it is the global batch.')
    self.config, self.source = config, source
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = config.batch_size // process_count
    self.local_eval_batch = config.eval_batch_size // process_count
    self.eval_steps = math.ceil(source.num_eval / config.eval_batch_size)

  @property
  def num_eval(self) -> int:
    """Returns the number of evaluation images over all processes."""
    return self.source.num_eval

  @property
  def num_classes(self) -> int:
    """Returns K, the number of foreground classes."""
    return len(self.source.category_ids)

  @property
  def category_ids(self) -> tuple[int, ...]:
    """Returns the dataset category id of each contiguous label."""
    return self.source.category_ids

  def ground_truth(self) -> evaluation.COCO:
    """Returns the evaluation split's ground truth (all processes' images) for COCOeval."""
    return self.source.ground_truth()

  def train_dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """Returns the endless training batches from step `start_step` on (with '_num_boxes')."""
    config = self.config
    ds = self.source.train_examples(start_step, local_batch=self.local_batch,
                                    global_batch=config.batch_size)
    seed = self.source.augment_seed

    def augment(position, example):
      return _transform(example, tf.stack([tf.constant(seed, tf.int64), position]), config,
                        train=True)

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._options(ds.batch(self.local_batch, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE))

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    """Yields this process's training batches from `start_step` on, endlessly."""
    yield from _strip(self.train_dataset(start_step).as_numpy_iterator(),
                      self.config.max_boxes)

  def eval_dataset(self) -> tf.data.Dataset:
    """Returns this process's `eval_steps` evaluation batches, padded with valid=False."""
    config = self.config
    seed = tf.zeros([2], tf.int64)
    ds = self.source.eval_examples().map(
        lambda example: _transform(example, seed, config, train=False),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = tf.data.Dataset.from_tensors(_padding_example(config)).repeat()
    ds = ds.concatenate(pad).take(self.eval_steps * self.local_eval_batch)
    return self._options(ds.batch(self.local_eval_batch, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE))

  def _options(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """Returns `ds` with tf.data's autotuning off for a source held in memory.

    With it on, deleting a digit-scenes iterator (the training one when a run ends, an
    evaluation one when it is exhausted) sometimes waited 20-45 s for one of tf.data's
    threads (in `UnboundedThreadPool::LogicalThreadWrapper`'s destructor; the autotuning
    thread wakes at growing intervals of up to a minute); with it off, no such wait was seen.
    The parallel maps then run at tf.data's default parallelism; the batches are the same.
    """
    if not getattr(self.source, 'in_memory', False):
      return ds
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)

  def eval_batches(self) -> Iterator[Batch]:
    """Yields this process's evaluation batches (every image once over all processes)."""
    yield from _strip(self.eval_dataset().as_numpy_iterator(), self.config.max_boxes)


# ----------------------------------------------------------------------------- COCO (tfds)

def coco_not_prepared_message(data_dir: str) -> str:
  """Returns what to do when tfds's coco/2017 is not prepared in `data_dir`."""
  where = tfds_data_dir(data_dir)
  manual = os.path.join(where, 'downloads', 'manual')
  return (
      f'COCO 2017 (tfds "coco/2017") is not prepared in {where}.\n'
      'Prepare it once on a machine with internet access (about 25 GB to download):\n'
      f'  tfds build coco/2017 --data_dir={where}\n'
      'Without internet access, first put the zips from http://images.cocodataset.org/ '
      '(zips/train2017.zip, zips/val2017.zip, zips/test2017.zip,\n'
      f'annotations/annotations_trainval2017.zip, annotations/image_info_test2017.zip) in '
      f'{manual} (tfds then uses them).\n'
      f'Then rerun with data_dir={where} (or set TFDS_DATA_DIR).')


def annotations_missing_message(path: str, data_dir: str) -> str:
  """Returns what to do when COCO's annotation json `path` is missing."""
  where = tfds_data_dir(data_dir)
  return (
      f'COCO annotation file {path} not found (needed for masks and for the official '
      'evaluation ground truth; tfds coco/2017 has no masks).\n'
      f'Download {ANNOTATIONS_URL} and unzip it in {where} (it creates '
      f'{os.path.join(where, "annotations")}/instances_{{train,val}}2017.json), or set '
      'annotations_dir to the folder that holds those files.')


def annotation_file(config: DetectionDataConfig, split: str) -> str:
  """Returns the path of COCO's instances json of `split`; raises DetectionDataNotFoundError.

  Looks in `annotations_dir`, else `<data_dir>/annotations`, then in the annotation zip that
  `tfds build coco/2017` extracted under `<data_dir>/downloads/extracted`.
  """
  base = split.split('[')[0]
  if base not in _COCO_JSON:
    raise ValueError(f"COCO annotations exist for the splits 'train' and 'validation', not "
                     f'{split!r}.')
  name = _COCO_JSON[base]
  where = tfds_data_dir(config.data_dir)
  path = os.path.join(config.annotations_dir or os.path.join(where, 'annotations'), name)
  if os.path.exists(path):
    return path
  if not config.annotations_dir:
    extracted = sorted(glob.glob(os.path.join(
        where, 'downloads', 'extracted', '*annotations_trainval2017*', 'annotations', name)))
    if extracted:
      return extracted[0]
  raise DetectionDataNotFoundError(annotations_missing_message(path, config.data_dir))


class _CocoMasks:
  """Rasterises COCO annotations (by annotation id) with pycocotools, loading the json once."""

  def __init__(self, path: str):
    self.path = path
    self._coco = None
    self._lock = threading.Lock()

  def coco(self):
    with self._lock:
      if self._coco is None:
        self._coco = evaluation.load_coco(self.path)
      return self._coco

  def __call__(self, annotation_ids: np.ndarray, height, width) -> np.ndarray:
    coco = self.coco()
    masks = np.zeros((len(annotation_ids), int(height), int(width)), np.uint8)
    for i, ann_id in enumerate(annotation_ids.tolist()):
      if ann_id not in coco.anns:
        raise ValueError(f'COCO annotation id {ann_id} (from tfds) is not in {self.path}; is '
                         'it the json of this split?')
      mask = coco.annToMask(coco.anns[ann_id])
      if mask.shape != masks.shape[1:]:
        raise ValueError(f'COCO annotation {ann_id}: mask {mask.shape} but image '
                         f'{masks.shape[1:]}; is {self.path} the json of this split?')
      masks[i] = mask
    return masks


class CocoSource:
  """tfds's coco/2017 read per process, images left encoded until after the shuffle/skip."""

  def __init__(self, config: DetectionDataConfig, *, process_index: int, process_count: int):
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self.category_ids = COCO_CATEGORY_IDS
    sub = lambda split, n: f'{split}[:{n}]' if n else split
    self._train_split = sub(config.train_split, config.train_subset)
    self._eval_split = sub(config.eval_split, config.eval_subset)
    try:  # as_dataset only reads prepared files: it never downloads
      self._builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
      self.num_eval = int(self._builder.as_dataset(split=self._eval_split).cardinality())
    except AssertionError as e:
      raise DetectionDataNotFoundError(coco_not_prepared_message(config.data_dir)) from e
    except Exception as e:  # pylint: disable=broad-except
      # A folder that a build left half-written (unreadable dataset_info.json, missing shards).
      what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
      raise DetectionDataNotFoundError(
          f'The tfds {config.dataset} folder in {tfds_data_dir(config.data_dir)} cannot be '
          f'read ({type(e).__name__}: {what}); a build may have stopped half-way. Move that '
          'folder aside and build it again:\n' + coco_not_prepared_message(config.data_dir)
      ) from None
    self._masks = None
    if config.masks:
      self._masks = _CocoMasks(annotation_file(config, config.train_split))
    self.augment_seed = derive_seed(config.seed, process_index)

  def _read(self, split, *, shuffle_seed: int | None) -> tf.data.Dataset:
    share = tfds.split_for_jax_process(split, process_index=self.process_index,
                                       process_count=self.process_count)
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True)
    return self._builder.as_dataset(split=share, shuffle_files=shuffle_seed is not None,
                                    read_config=read_config,
                                    decoders={'image': tfds.decode.SkipDecoding()})

  def _parse(self, example: dict, *, masks: bool) -> dict:
    image = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    objects = example['objects']
    bbox = tf.reshape(objects['bbox'], [-1, 4])  # normalised ymin, xmin, ymax, xmax
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    raw = {'image': image, 'image_id': example['image/id'],
           'boxes': tf.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h],
                             -1),
           'labels': tf.cast(objects['label'], tf.int32), 'is_crowd': objects['is_crowd']}
    if masks:
      raw['masks'] = tf.ensure_shape(tf.numpy_function(
          self._masks, [objects['id'], height, width], tf.uint8, stateful=False),
          [None, None, None])
    return raw

  def train_examples(self, start_step: int, *, local_batch: int, global_batch: int
                     ) -> tf.data.Dataset:
    """Returns this process's endless (stream position, raw example) pairs from the first
    example of step `start_step` on."""
    del global_batch
    seed = self.augment_seed
    ds = self._read(self._train_split, shuffle_seed=seed).repeat()
    if self.config.shuffle_buffer:
      ds = ds.shuffle(self.config.shuffle_buffer, seed=seed)
    if self.config.filter_empty:
      ds = ds.filter(lambda ex: tf.reduce_any(~ex['objects']['is_crowd']))
    ds = ds.enumerate().skip(start_step * local_batch)
    return ds.map(lambda position, ex: (position, self._parse(ex, masks=self.config.masks)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def eval_examples(self) -> tf.data.Dataset:
    """Returns this process's share of the evaluation split, in order."""
    return self._read(self._eval_split, shuffle_seed=None).map(
        lambda ex: self._parse(ex, masks=False), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)

  def ground_truth(self) -> evaluation.COCO:
    """Returns the official json of the evaluation split if present (needed for mask AP);
    else the boxes that tfds stores (COCO's areas truncated to integers; no masks)."""
    try:
      return evaluation.load_coco(annotation_file(self.config, self.config.eval_split))
    except DetectionDataNotFoundError as e:
      logging.warning('%s\nEvaluating boxes against the ground truth stored by tfds instead.',
                      e)
    ds = self._builder.as_dataset(split=self._eval_split,
                                  decoders={'image': tfds.decode.SkipDecoding()})

    def sizes(ex):
      data = ex['image']
      shape = tf.cond(tf.io.is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data),
                      lambda: tf.shape(tf.io.decode_image(data, channels=3,
                                                          expand_animations=False)))
      return {'image/id': ex['image/id'], 'size': shape[:2], 'objects': ex['objects']}

    ids, sizes_, boxes, labels, valid, crowd, areas = [], [], [], [], [], [], []
    for ex in ds.map(sizes, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
      h, w = ex['size']
      bbox = ex['objects']['bbox'].reshape(-1, 4)
      ids.append(ex['image/id'])
      sizes_.append(ex['size'])
      boxes.append(np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h],
                            -1))
      labels.append(ex['objects']['label'])
      crowd.append(ex['objects']['is_crowd'])
      areas.append(ex['objects']['area'])
      valid.append(np.ones(len(bbox), bool))
    g = max([len(b) for b in boxes] + [1])
    pad = lambda rows, shape=(): np.stack(
        [np.concatenate([r, np.zeros((g - len(r), *shape), r.dtype)]) for r in rows])
    return evaluation.coco_from_arrays(
        np.array(ids), np.array(sizes_), pad(boxes, (4,)), pad(labels), pad(valid),
        self.category_ids, is_crowd=pad(crowd), areas=pad(areas))


# ----------------------------------------------------------------------------- digit scenes

class SceneSource:
  """The digit scenes, in memory on every process (see `scenes.py`)."""

  in_memory = True  # `DetectionPipeline._options`

  def __init__(self, config: DetectionDataConfig, *, process_index: int, process_count: int):
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self.category_ids = scenes.CATEGORY_IDS
    self.train = scenes.make_scenes(config.scenes, 'train')
    self.eval = scenes.make_scenes(config.scenes, 'eval')
    if config.train_subset:
      self.train = _first(self.train, config.train_subset)
    if config.eval_subset:
      self.eval = _first(self.eval, config.eval_subset)
    self.num_train, self.num_eval = len(self.train), len(self.eval)
    self.augment_seed = derive_seed(config.seed)  # the same on every process

  @staticmethod
  def _raw(arrays: dict, row) -> dict:
    """Returns the raw example at `row` of the scenes' (captured) tensors."""
    keep = tf.gather(arrays['valid'], row)
    pick = lambda key: tf.boolean_mask(tf.gather(arrays[key], row), keep)
    return {'image': tf.gather(arrays['images'], row),
            'image_id': tf.gather(arrays['image_ids'], row), 'boxes': pick('boxes'),
            'labels': pick('labels'), 'is_crowd': tf.zeros_like(pick('labels'), tf.bool),
            'masks': pick('masks')}

  @staticmethod
  def _tensors(data: scenes.DigitScenes) -> dict:
    return {f.name: tf.constant(getattr(data, f.name)) for f in dataclasses.fields(data)
            if f.name != 'digit_index'}

  def train_examples(self, start_step: int, *, local_batch: int, global_batch: int
                     ) -> tf.data.Dataset:
    """Returns this process's endless (global position, raw example) pairs from step
    `start_step` on (`_shuffled_rows`)."""
    arrays = self._tensors(self.train)
    rows = _shuffled_rows(self.num_train, self.augment_seed, start_step, 'training scenes',
                          local_batch=local_batch, global_batch=global_batch,
                          process_index=self.process_index)
    return rows.map(lambda position, row: (position, self._raw(arrays, row)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def eval_examples(self) -> tf.data.Dataset:
    """Returns this process's contiguous share of the evaluation scenes, in order."""
    arrays = self._tensors(self.eval)
    share = process_share(self.num_eval, self.process_index, self.process_count)
    return tf.data.Dataset.range(share.start, share.stop).map(
        lambda row: self._raw(arrays, row), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)

  def ground_truth(self) -> evaluation.COCO:
    """Returns the evaluation scenes' boxes and masks as a COCO object."""
    return self.eval.coco()


def _first(data: scenes.DigitScenes, n: int) -> scenes.DigitScenes:
  return scenes.DigitScenes(**{f.name: getattr(data, f.name)[:n]
                               for f in dataclasses.fields(data)})


# ----------------------------------------------------------------------------- your COCO json

class CocoJsonSource:
  """A COCO-format json and image folder per split, held in memory on every process like the
  digit scenes (same batches on any process count, exact resume); images are read and
  decoded in the pipeline, masks rasterised from the json when a training batch needs them.
  Training reads the images with a non-crowd annotation (all images without
  `filter_empty`); `train_subset`/`eval_subset` keep the first N by image id."""

  def __init__(self, config: DetectionDataConfig, *, process_index: int, process_count: int):
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    unset = [f'config.{name}' for name in ('train_annotations', 'train_images',
                                           'eval_annotations') if not getattr(config, name)]
    if unset:
      raise ValueError(
          f"dataset='coco_json' reads your own COCO-format data: set {', '.join(unset)} (the "
          'instances jsons of the training and evaluation splits and the folder of the '
          'training images; eval_images defaults to it). See docs/custom.md.')
    train = coco_json.read_split(config.train_annotations, config.train_images,
                                 masks=config.masks)
    self.category_ids = train.category_ids
    self.eval = coco_json.read_split(config.eval_annotations,
                                     config.eval_images or config.train_images,
                                     category_ids=self.category_ids, masks=config.masks,
                                     evaluation=True)
    rows = train.rows_with_objects() if config.filter_empty else np.arange(len(train))
    if not len(rows):
      raise coco_json.CocoJsonError(f'{config.train_annotations}: no image has a non-crowd '
                                    'annotation; there is nothing to train on.')
    self.train = train.take(rows[:config.train_subset or None])
    if len(self.train) < config.batch_size:
      raise coco_json.CocoJsonError(
          f'{config.train_annotations}: {len(self.train)} training images (with a non-crowd '
          f'annotation{", of train_subset" if config.train_subset else ""}) are fewer than '
          f'one global batch (batch_size={config.batch_size}): lower config.batch_size or '
          'add images.')
    if config.eval_subset:
      self.eval = self.eval.take(np.arange(min(config.eval_subset, len(self.eval))))
    self.num_train, self.num_eval = len(self.train), len(self.eval)
    self.augment_seed = derive_seed(config.seed)  # the same on every process

  @staticmethod
  def _tensors(split: coco_json.CocoJsonSplit) -> dict:
    return {name: tf.constant(getattr(split, name)) for name in (
        'paths', 'image_ids', 'row_splits', 'boxes', 'labels', 'is_crowd')}

  @staticmethod
  def _raw(split: coco_json.CocoJsonSplit, arrays: dict, row, *, masks: bool) -> dict:
    """Returns the raw example of image `row`: decoded, its annotations (crowd ones too)."""
    image = tf.io.decode_image(tf.io.read_file(arrays['paths'][row]), channels=3,
                               expand_animations=False)
    start, stop = arrays['row_splits'][row], arrays['row_splits'][row + 1]
    raw = {'image': image, 'image_id': arrays['image_ids'][row],
           'boxes': arrays['boxes'][start:stop], 'labels': arrays['labels'][start:stop],
           'is_crowd': arrays['is_crowd'][start:stop]}
    if masks:
      raw['masks'] = tf.ensure_shape(tf.numpy_function(
          split.masks, [row], tf.uint8, stateful=False), [None, None, None])
    return raw

  def train_examples(self, start_step: int, *, local_batch: int, global_batch: int
                     ) -> tf.data.Dataset:
    """Returns this process's endless (global position, raw example) pairs from step
    `start_step` on (`_shuffled_rows`)."""
    arrays, masks = self._tensors(self.train), self.config.masks
    rows = _shuffled_rows(self.num_train, self.augment_seed, start_step,
                          f'training images (of {self.config.train_annotations})',
                          local_batch=local_batch, global_batch=global_batch,
                          process_index=self.process_index)
    return rows.map(
        lambda position, row: (position, self._raw(self.train, arrays, row, masks=masks)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def eval_examples(self) -> tf.data.Dataset:
    """Returns this process's contiguous share of the evaluation images, in id order."""
    arrays = self._tensors(self.eval)
    share = process_share(self.num_eval, self.process_index, self.process_count)
    return tf.data.Dataset.range(share.start, share.stop).map(
        lambda row: self._raw(self.eval, arrays, row, masks=False),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def ground_truth(self) -> evaluation.COCO:
    """Returns the evaluation json's annotations (the json's category ids, crowd regions
    as crowd) as a COCO object."""
    return self.eval.coco()


def create_detection_pipeline(config: DetectionDataConfig, *, process_index: int = 0,
                              process_count: int = 1) -> DetectionPipeline:
  """Returns the pipeline of `config.dataset` ('coco/2017', 'digit_scenes' or 'coco_json').

  Raises DetectionDataNotFoundError (a DatasetNotFoundError) saying what to download when
  COCO or, with masks, its annotation json is missing; for 'coco_json', DatasetNotFoundError
  (a json or folder missing) or coco_json.CocoJsonError (a ValueError naming what is wrong).
  """
  share = dict(process_index=process_index, process_count=process_count)
  if config.dataset == 'digit_scenes':
    source = SceneSource(config, **share)
  elif config.dataset == 'coco_json':
    source = CocoJsonSource(config, **share)
  elif config.dataset.startswith('coco/'):
    source = CocoSource(config, **share)
  else:
    raise ValueError(f"Unknown detection dataset {config.dataset!r}; known: 'coco/2017', "
                     "'digit_scenes', 'coco_json' (your own COCO-format json and images).")
  return DetectionPipeline(config, source, **share)
