"""A folder of your own images as a classification dataset, with the CIFAR or ImageNet recipe.

The layout torchvision's and tfds's `ImageFolder` read, one subfolder per class in each
split:

    ROOT/train/<class>/*.jpg|jpeg|png|bmp|gif
    ROOT/val/<class>/...          (the eval split; another name with `eval_split`)

Classes are the sorted subfolder names of `train/` (label i = the i-th); every class
folder of the eval split must be one of them. Files with other extensions and files
directly in a split folder are ignored. Every image file is opened once when the folder is
registered (`PIL.Image.verify`), so a file that is not a readable image stops the run
before training, with its name. Paths go through `tf.io.gfile`, so `gs://` folders work.

The dataset is held like the in-memory datasets (CIFAR-100, digits): every process holds
the list of files and labels, global batches are drawn from the same permutation on every
process and each process decodes its rows, so batches, their order and their augmentation
do not depend on the process count, and a run resumed mid-epoch sees the batches of an
uninterrupted one (`pipeline.py`). Images are decoded in the tf.data pipeline:

- `augmentation='cifar'`: each image is resized (shorter side to `image_size`, bilinear
  with antialiasing, then the centre square; images already `image_size` square are left
  as they are), then the CIFAR recipe: zero-pad by `image_size // 8`, random crop, flip.
  Evaluation: the resized image.
- `augmentation='imagenet'`: the ImageNet recipe on the encoded file (`preprocess.py`):
  RandomResizedCrop to `image_size` + flip; evaluation resize to `round(image_size * 256 /
  224)` and centre crop. It reads JPEG bytes: files in other formats are decoded and
  re-encoded as JPEG (quality 95) on the fly, as tfds does when it prepares ImageNet.

`mean`/`std` (per channel, [0, 1] scale) are given, or computed over up to 2000 training
images spread evenly over the sorted file list (each reduced to at most 256 px on its longer
side first): the per-channel mean and standard deviation of their pixels.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Sequence

import numpy as np

from reviewkd_jax.data import datasets
from reviewkd_jax.lazy_imports import tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
AUGMENTATIONS = ('cifar', 'imagenet')
STATS_IMAGES = 2000
STATS_SIDE = 256


class ImageFolderError(ValueError):
  """The folder is not a dataset as laid out in the module docstring; the message says why."""


def is_folder_name(name: str) -> bool:
  """Returns True for a dataset name that is a path (not a built-in dataset's name).

  A name without a separator can only be a local folder (remote ones are URLs), so it is
  looked up with `os.path`, not TensorFlow: a misspelt dataset name is told without it.
  """
  return name not in datasets.DATASETS and bool(name) and (
      '/' in name or os.sep in name or os.path.isdir(name))


def _join(*parts: str) -> str:
  return '/'.join([parts[0].rstrip('/'), *parts[1:]])


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(root: str, split: str) -> list[str]:
  folder = _join(root, split)
  if not tf.io.gfile.isdir(folder):
    present = sorted(n.rstrip('/') for n in tf.io.gfile.listdir(root)
                     if tf.io.gfile.isdir(_join(root, n.rstrip('/'))))
    raise ImageFolderError(
        f'Image folder {root}: no {split}/ folder (it holds: {", ".join(present) or "none"}). '
        f'Lay it out as {root}/{split}/<class name>/<image files>.')
  return sorted(n.rstrip('/') for n in tf.io.gfile.listdir(folder)
                if tf.io.gfile.isdir(_join(folder, n.rstrip('/'))))


def scan_split(root: str, split: str, classes: Sequence[str] | None = None
               ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Returns (classes, file paths, labels) of `root/split`, sorted by class then file name.

  `classes` None: the split's own class folders define them (the training split); else
  every class folder of the split must be one of `classes`. Raises ImageFolderError for a
  missing split, no class folder, an empty class folder or an unknown class.
  """
  found = _class_folders(root, split)
  if not found:
    raise ImageFolderError(f'Image folder {root}/{split} has no class subfolders: put each '
                           f"class's images in {root}/{split}/<class name>/.")
  if classes is None:
    classes = found
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise ImageFolderError(
        f'Image folder {root}/{split} has class folders the training split does not: '
        f'{", ".join(unknown)}. Every class needs training images in {root}/train/.')
  paths, labels, empty = [], [], []
  for label, name in enumerate(classes):
    if name not in found:
      continue
    files = sorted(f for f in tf.io.gfile.listdir(_join(root, split, name)) if _is_image(f))
    if not files:
      empty.append(_join(root, split, name))
    paths += [_join(root, split, name, f) for f in files]
    labels += [label] * len(files)
  if empty:
    raise ImageFolderError(
        f'Image folder {root}: {len(empty)} class folder(s) hold no images '
        f'({", ".join(IMAGE_EXTENSIONS)}): {", ".join(empty)}. Add images or remove the '
        'folder.')
  return list(classes), np.asarray(paths), np.asarray(labels, np.int32)


def _check_file(path: str) -> str | None:
  """Returns None if `path` is a readable image, else the reason it is not."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, Image.open(f) as image:
      image.verify()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def check_images(root: str, paths: Sequence[str]) -> None:
  """Raises ImageFolderError naming every file of `paths` that is not a readable image."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    reasons = list(pool.map(_check_file, paths))
  bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
  if bad:
    shown = '\n'.join(f'  {p}: {r}' for p, r in bad[:20])
    more = f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else ''
    raise ImageFolderError(
        f'Image folder {root}: {len(bad)} file(s) do not decode as images:\n{shown}{more}\n'
        'Remove or replace them.')


def image_stats(paths: Sequence[str], *, max_images: int = STATS_IMAGES,
                max_side: int = STATS_SIDE) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Returns per-channel (mean, std) on the [0, 1] scale over the pixels of up to
  `max_images` images spread evenly over `paths`, each shrunk to `max_side` px at most."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n = len(paths)
  rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
  total, total_sq, count = np.zeros(3), np.zeros(3), 0
  for row in rows:
    with tf.io.gfile.GFile(paths[row], 'rb') as f, Image.open(f) as image:
      image = image.convert('RGB')
      if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
      pixels = np.asarray(image, np.float64).reshape(-1, 3) / 255.0
    total += pixels.sum(0)
    total_sq += np.square(pixels).sum(0)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_square(contents: tf.Tensor, size: int) -> tf.Tensor:
  """Returns the image file `contents` as uint8 (size, size, 3): shorter side resized to
  `size` (bilinear, antialiased), then the centre square; a size x size image unchanged."""
  image = tf.io.decode_image(contents, channels=3, expand_animations=False)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]

  def resized():
    scale = size / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    nw = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    out = tf.image.resize(tf.cast(image, tf.float32), (nh, nw), method='bilinear',
                          antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return _to_uint8(out[top:top + size, left:left + size])

  image = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: image, resized)
  return tf.ensure_shape(image, (size, size, 3))


def as_jpeg(contents: tf.Tensor) -> tf.Tensor:
  """Returns JPEG bytes of an image file: a JPEG as it is, other formats re-encoded."""
  return tf.cond(
      tf.equal(tf.strings.substr(contents, 0, 2), b'\xff\xd8'), lambda: contents,
      lambda: tf.io.encode_jpeg(tf.io.decode_image(contents, channels=3,
                                                   expand_animations=False), quality=95))


class ImageFolderSource(datasets.ArraySource):
  """The files of an image folder, held like an in-memory dataset (module docstring); the
  examples' `image` is decoded (CIFAR recipe) or JPEG bytes (ImageNet recipe)."""

  def __init__(self, spec: datasets.DatasetSpec, train, test, *, process_index: int,
               process_count: int):
    super().__init__(train, test, process_index=process_index, process_count=process_count)
    size = spec.image_size
    read = tf.io.read_file
    if spec.kind == 'crop':
      self._load = lambda path: decode_square(read(path), size)
    else:
      self._load = lambda path: as_jpeg(read(path))

  def _loaded(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(lambda ex: {**ex, 'image': self._load(ex['image'])},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def train_examples_at(self, rows: np.ndarray) -> tf.data.Dataset:
    """Returns the training examples at dataset indices `rows`, in that order, loaded."""
    return self._loaded(super().train_examples_at(rows))

  def eval_examples(self) -> tf.data.Dataset:
    """Returns this process's evaluation examples in dataset order, loaded."""
    return self._loaded(super().eval_examples())


def register_image_folder(root: str, *, augmentation: str = 'cifar', image_size: int = 32,
                          mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None, flip: bool = True,
                          eval_split: str = 'val', name: str | None = None,
                          check: bool = True) -> datasets.DatasetSpec:
  """Scans `root`, checks its images and registers it as dataset `name` (default: `root`).

  Returns its spec; `data.get_spec(name)` and `data.create_input_pipeline` then know it.
  Raises ImageFolderError (a ValueError) for a folder that is not a dataset, naming the
  folder or files at fault.
  """
  if augmentation not in AUGMENTATIONS:
    raise ImageFolderError(f'Image folder augmentation must be one of {AUGMENTATIONS}, got '
                           f'{augmentation!r}.')
  if not isinstance(image_size, (int, np.integer)) or image_size < 8:
    raise ImageFolderError(f'Image folder image_size must be an integer >= 8, got '
                           f'{image_size!r}.')
  if not tf.io.gfile.isdir(root):
    raise ImageFolderError(f'No image folder at {root}.')
  classes, train_paths, train_labels = scan_split(root, 'train')
  _, eval_paths, eval_labels = scan_split(root, eval_split, classes)
  if check:
    check_images(root, [*train_paths, *eval_paths])
  given = [v for v in (mean, std) if v]
  if len(given) == 1:
    raise ImageFolderError('Give both mean and std of the image folder, or neither (both '
                           'are then computed from the training images).')
  if given:
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise ImageFolderError(f'Image folder mean/std need 3 values each (RGB, [0, 1] scale), '
                             f'std > 0; got mean={mean}, std={std}.')
  else:
    mean, std = image_stats(train_paths)
    std = tuple(max(s, 1e-3) for s in std)  # a constant channel would divide by 0
  cifar = augmentation == 'cifar'
  spec = datasets.DatasetSpec(
      name=name or root, num_classes=len(classes), image_size=int(image_size), channels=3,
      mean=mean, std=std, train_split='train', eval_split=eval_split,
      kind='crop' if cifar else 'inception', crop_padding=int(image_size) // 8 if cifar else 0,
      random_flip=bool(flip), eval_resize=0 if cifar else round(image_size * 256 / 224),
      num_train=len(train_paths))

  def load(spec, *, process_index, process_count, train_subset=0):
    paths, labels = train_paths, train_labels
    if train_subset:
      # A fixed random subset, in file order: the first files would be the first classes.
      keep = np.sort(np.random.default_rng(0).permutation(len(paths))[:train_subset])
      paths, labels = paths[keep], labels[keep]
    return ImageFolderSource(spec, (paths, labels), (eval_paths, eval_labels),
                             process_index=process_index, process_count=process_count)

  datasets.register_dataset(spec, load)
  return spec


def register_from_config(config: Any) -> datasets.DatasetSpec | None:
  """Registers `config.dataset` if it is the path of an image folder (`config.folder_*`
  fields); returns its spec, or None for other datasets. What `main.py` calls before a run."""
  if 'folder_augmentation' not in config or not is_folder_name(config.dataset):
    return None
  return register_image_folder(
      config.dataset, augmentation=config.folder_augmentation,
      image_size=config.folder_image_size, mean=tuple(config.folder_mean) or None,
      std=tuple(config.folder_std) or None, flip=config.folder_flip,
      eval_split=config.folder_eval_split)
