"""The datasets the trainer knows: their facts (classes, sizes, normalisation) and sources.

A source hands out examples as `tf.data` datasets of `{'image', 'label', 'index'}`;
`pipeline.py` turns them into batches. Small datasets (CIFAR-100, digits) are held in host
memory by every process and permuted exactly per epoch, the same permutation on every
process; ImageNet is streamed from tfds's files, each process reading its share, with the
JPEGs left encoded until the crop is known.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from reviewkd_jax.data import digits
from reviewkd_jax.data.shares import process_share, tfds_data_dir
from reviewkd_jax.lazy_imports import tf, tfds


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared where tfds looks for it; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the trainer needs to know about a dataset.

  `mean`/`std` are per channel on the [0, 1] scale; images travel as uint8 and are normalised
  on the device. `kind` selects the augmentation: 'crop' (pad, random crop, optional flip)
  or 'inception' (RandomResizedCrop + flip; eval resize + centre crop). `num_train` is the
  size of the full training split; the trainer replaces it with its run's count
  (`train_subset`, mock data).
  """
  name: str
  num_classes: int
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str
  eval_split: str
  kind: str
  crop_padding: int = 0
  random_flip: bool = True
  eval_resize: int = 0  # 'inception': shorter side before the centre crop
  num_train: int = 0

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Returns the (H, W, C) of a model input."""
    return (self.image_size, self.image_size, self.channels)


DATASETS = {
    # The authors' CIFAR-100 recipe: RandomCrop(32, padding=4), flip, their mean/std.
    'cifar100': DatasetSpec(
        'cifar100', 100, 32, 3, tuple(v / 255 for v in (125.3, 123.0, 113.9)),
        tuple(v / 255 for v in (63.0, 62.1, 66.7)), 'train', 'test', 'crop', crop_padding=4,
        num_train=50000),
    'imagenet2012': DatasetSpec(
        'imagenet2012', 1000, 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 'train',
        'validation', 'inception', eval_resize=256, num_train=1281167),
    # scikit-learn's 8x8 digits upsampled to 32x32 (offline demo); mirrored digits are not
    # digits, so no flip. Mean/std of the training images.
    'digits': DatasetSpec(
        'digits', 10, 32, 3, (0.305,) * 3, (0.324,) * 3, 'train', 'test', 'crop',
        crop_padding=4, random_flip=False, num_train=1347),
}


# Datasets registered at run time (`image_folder.register_image_folder`): spec and loader
# `load(spec, *, process_index, process_count, train_subset) -> source`.
_REGISTERED: dict[str, tuple[DatasetSpec, Callable[..., Any]]] = {}


def register_dataset(spec: DatasetSpec, load: Callable[..., Any]) -> None:
  """Makes `get_spec(spec.name)` return `spec` and `load_source` call `load` for it."""
  if spec.name in DATASETS:
    raise ValueError(f'{spec.name!r} is a built-in dataset; choose another name.')
  _REGISTERED[spec.name] = (spec, load)


def get_spec(name: str) -> DatasetSpec:
  """Returns the spec of dataset `name`, or raises ValueError listing the known ones."""
  if name in _REGISTERED:
    return _REGISTERED[name][0]
  if name not in DATASETS:
    raise ValueError(
        f'Unknown dataset {name!r}; known datasets: {", ".join(DATASETS)}; or a folder of '
        'images in class subfolders (train/ and val/ splits), given as its path: main.py '
        'reads it (data.image_folder.register_from_config).')
  return DATASETS[name]


def _not_prepared_message(name: str, data_dir: str | None) -> str:
  where = tfds_data_dir(data_dir)
  if name == 'imagenet2012':
    manual = os.path.join(where, 'downloads', 'manual')
    return (
        f'ImageNet (tfds "imagenet2012") is not prepared in {where}.\n'
        'tfds cannot download ImageNet for you. To prepare it once:\n'
        '  1. Register at https://image-net.org/download-images and download\n'
        '     ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB).\n'
        f'  2. Put both tar files, unextracted, in tfds\'s manual dir: {manual}\n'
        f'  3. Run: tfds build imagenet2012 --data_dir={where}\n'
        '     (about 150 GB of disk and a few hours; --manual_dir=DIR if the tars are elsewhere).\n'
        f'Then rerun with --config.data_dir={where} (or set TFDS_DATA_DIR). On a TPU pod, '
        'prepare it in a bucket (gs://...) that every host can read.')
  return (
      f'Dataset {name!r} is not prepared in {where}.\n'
      f'Prepare it once on a machine with internet access:\n'
      f'  tfds build {name} --data_dir={where}\n'
      f'Then rerun with --config.data_dir={where} (or set TFDS_DATA_DIR); copy the folder to '
      'machines without internet access.')


def _tfds_builder(name: str, data_dir: str | None):
  builder = tfds.builder(name, data_dir=data_dir or None)
  try:  # no download is ever attempted: as_dataset only reads prepared files
    builder.as_dataset(split=DATASETS[name].train_split)
  except AssertionError as e:
    raise DatasetNotFoundError(_not_prepared_message(name, data_dir)) from e
  return builder


class ArraySource:
  """A dataset held in host memory: every process holds the whole training split (the global
  batches are drawn from it, so their content does not depend on the process count) and its
  own share of the evaluation split."""
  in_memory = True

  def __init__(self, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               *, process_index: int, process_count: int):
    self.num_train, self.num_eval = len(train[1]), len(test[1])
    images, labels = train
    self._train = {'image': images, 'label': np.asarray(labels, np.int32),
                   'index': np.arange(self.num_train, dtype=np.int32)}
    self._eval = self._share(test, process_index, process_count)

  @staticmethod
  def _share(split, process_index, process_count):
    images, labels = split
    part = process_share(len(labels), process_index, process_count)
    return {'image': images[part], 'label': labels[part].astype(np.int32),
            'index': np.arange(len(labels), dtype=np.int32)[part]}

  @property
  def train_labels(self) -> np.ndarray:
    """Returns the labels of the whole training split, by dataset index."""
    return self._train['label']

  def train_examples_at(self, rows: np.ndarray) -> tf.data.Dataset:
    """Returns the training examples at dataset indices `rows`, in that order."""
    return tf.data.Dataset.from_tensor_slices({k: v[rows] for k, v in self._train.items()})

  def eval_examples(self) -> tf.data.Dataset:
    """Returns this process's evaluation examples in dataset order."""
    return tf.data.Dataset.from_tensor_slices(self._eval)


class TfdsStreamSource:
  """A tfds dataset read from its files with images left encoded (ImageNet); each process
  reads its own share of the files, so its batches depend on the process count."""
  in_memory = False

  def __init__(self, builder, spec: DatasetSpec, *, process_index: int, process_count: int,
               shuffle_buffer: int, train_split: str):
    self._builder = builder
    self._train_split = tfds.split_for_jax_process(
        train_split, process_index=process_index, process_count=process_count)
    self._eval_split = tfds.split_for_jax_process(
        spec.eval_split, process_index=process_index, process_count=process_count)
    self._shuffle_buffer = shuffle_buffer
    # Counts from the datasets' cardinality (tfds asserts it from the prepared files).
    self.num_train = int(builder.as_dataset(split=train_split).cardinality())
    self.num_eval = int(builder.as_dataset(split=spec.eval_split).cardinality())
    self.local_num_train = int(builder.as_dataset(split=self._train_split).cardinality())
    self.train_labels = None

  def _read(self, split, *, shuffle_seed: int | None) -> tf.data.Dataset:
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True)
    ds = self._builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
        decoders={'image': tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32),
                              'index': tf.constant(-1, tf.int32)})

  def train_examples(self, epoch_seed: int) -> tf.data.Dataset:
    """Returns this process's training examples: files and a buffer shuffled by the seed."""
    ds = self._read(self._train_split, shuffle_seed=epoch_seed)
    return ds.shuffle(self._shuffle_buffer, seed=epoch_seed)

  def eval_examples(self) -> tf.data.Dataset:
    """Returns this process's evaluation examples in file order."""
    return self._read(self._eval_split, shuffle_seed=None)


def _tfds_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  ds = builder.as_dataset(split=split)
  data = tfds.as_numpy(ds.batch(int(ds.cardinality())).get_single_element())
  return data['image'], data['label']


def load_source(spec: DatasetSpec, *, data_dir: str | None, process_index: int,
                process_count: int, shuffle_buffer: int = 16384, train_subset: int = 0):
  """Returns the example source of `spec`, or raises DatasetNotFoundError saying what to do.

  `train_subset` > 0 keeps only the first that many training examples (data-efficiency
  experiments; the digits demo); the eval split is always whole.
  """
  share = dict(process_index=process_index, process_count=process_count)
  if spec.name in _REGISTERED:
    return _REGISTERED[spec.name][1](spec, train_subset=train_subset, **share)
  keep = slice(train_subset or None)
  if spec.name == 'digits':
    (x_train, y_train), test = digits.load_digits_32()
    return ArraySource((x_train[keep], y_train[keep]), test, **share)
  builder = _tfds_builder(spec.name, data_dir)
  if spec.name == 'cifar100':
    x_train, y_train = _tfds_arrays(builder, spec.train_split)
    return ArraySource((x_train[keep], y_train[keep]), _tfds_arrays(builder, spec.eval_split),
                       **share)
  train_split = f'{spec.train_split}[:{train_subset}]' if train_subset else spec.train_split
  return TfdsStreamSource(builder, spec, shuffle_buffer=shuffle_buffer, train_split=train_split,
                          **share)

