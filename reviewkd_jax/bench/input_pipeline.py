"""Images/s of this project's input pipeline on one host, on data the benchmark synthesises.

The pipeline measured is `reviewkd_jax.data.InputPipeline`, the trainer's own: the same
shuffling, stateless augmentation, batching and prefetch, fed by sources that stand in for
the tfds ones without a download:

- 'cifar100': 50,000 random 32x32 uint8 images held in memory, like `ArraySource`
  (pad-crop-flip augmentation).
- 'imagenet': JPEGs synthesised at ImageNet's typical resolutions and file sizes, streamed
  encoded, like `TfdsStreamSource` (window decode of RandomResizedCrop, resize to 224, flip).
  Natural photos are not random noise: the images are smooth random fields plus mild noise,
  tuned so their JPEG size is near ImageNet's mean (~110 KB); the size is reported.

Each measurement runs the pipeline alone (no train step competing for the cores): it says
whether one host's CPUs can feed the step, not what they do while also running it.
"""
from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf

from reviewkd_jax import data
from reviewkd_jax.data import pipeline as pipeline_lib

# (height, width) of the synthetic JPEGs: ImageNet's most common shapes (most training images
# are 500 px on the long side; the mean is about 400x350).
JPEG_SHAPES = ((375, 500), (500, 375), (333, 500), (500, 333), (400, 400), (300, 400))


class SyntheticArraySource:
  """A CIFAR-sized in-memory source: random uint8 images, labels and indices."""

  in_memory = True

  def __init__(self, spec: data.DatasetSpec, num_train: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.num_train, self.num_eval = num_train, 0
    self._images = rng.integers(0, 256, (num_train, *spec.image_shape), dtype=np.uint8)
    self._labels = rng.integers(0, spec.num_classes, (num_train,), dtype=np.int32)
    self.train_labels = self._labels

  def train_examples_at(self, rows: np.ndarray) -> tf.data.Dataset:
    """Returns the examples at `rows`, in that order (as `ArraySource`)."""
    return tf.data.Dataset.from_tensor_slices({
        'image': self._images[rows], 'label': self._labels[rows],
        'index': rows.astype(np.int32)})


def synthetic_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
  """Returns `count` JPEGs at ImageNet's typical sizes with photo-like (smooth) content."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    h, w = JPEG_SHAPES[i % len(JPEG_SHAPES)]
    # A smooth colour field (bilinear upsampling of a coarse random grid) plus texture.
    coarse = rng.uniform(0, 255, (1, 12, 16, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, (h, w), method='bicubic')[0].numpy()
    texture = rng.normal(0, 22, (h, w, 3)).astype(np.float32)
    image = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(image, quality=quality).numpy())
  return out


class SyntheticJpegSource:
  """A streamed source of encoded JPEGs (as `TfdsStreamSource` yields them), cycled."""
  in_memory = False

  def __init__(self, jpegs: list[bytes], num_train: int, num_classes: int, seed: int = 0):
    self.num_train, self.num_eval = num_train, 0
    self.local_num_train = num_train
    self.train_labels = None
    self._jpegs = np.asarray(jpegs, dtype=object)
    self._labels = np.random.default_rng(seed).integers(0, num_classes, len(jpegs),
                                                        dtype=np.int32)

  def train_examples(self, epoch_seed: int) -> tf.data.Dataset:
    """Returns the JPEGs repeated, shuffled with the seed (a file-shuffle stand-in)."""
    ds = tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(list(self._jpegs), tf.string), 'label': self._labels,
        'index': np.full(len(self._labels), -1, np.int32)})
    return ds.repeat().shuffle(len(self._labels), seed=epoch_seed)


def _time_batches(pipeline: data.InputPipeline, *, warmup: int, batches: int,
                  device_put=None) -> tuple[float, float]:
  """Returns (seconds per batch after warm-up, seconds to the first batch)."""
  t0 = time.perf_counter()
  it = pipeline.train_batches(0)
  if device_put is not None:
    it = device_put(it)
  first_s = None
  for i, batch in enumerate(it):
    if i == 0:
      _ready(batch)
      first_s = time.perf_counter() - t0
    if i == warmup:
      _ready(batch)
      t0 = time.perf_counter()
    if i == warmup + batches:
      _ready(batch)
      return (time.perf_counter() - t0) / batches, first_s
  raise RuntimeError('the pipeline ended before the measurement did')


def _ready(batch):
  for v in batch.values():
    if hasattr(v, 'block_until_ready'):
      v.block_until_ready()


def measure(dataset: str, *, batch_size: int, batches: int = 30, warmup: int = 5,
            num_jpegs: int = 512, seed: int = 0, with_device: bool = True) -> dict:
  """Returns images/s of the training input pipeline of `dataset` ('cifar100'|'imagenet')."""
  import jax  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  name = {'cifar100': 'cifar100', 'imagenet': 'imagenet2012',
          'imagenet2012': 'imagenet2012'}.get(dataset)
  if name is None:
    raise ValueError(f"input pipeline dataset must be 'cifar100' or 'imagenet', got "
                     f'{dataset!r}')
  spec = data.get_spec(name)
  process_count = jax.process_count()
  needed = (warmup + batches + 2) * batch_size
  t0 = time.perf_counter()
  extra = {}
  if spec.kind == 'crop':
    source = SyntheticArraySource(spec, max(50_000, needed), seed)
  else:
    jpegs = synthetic_jpegs(num_jpegs, seed)
    sizes = np.asarray([len(j) for j in jpegs])
    extra = {'jpeg_count': num_jpegs, 'jpeg_mean_bytes': float(sizes.mean()),
             'jpeg_shapes': [list(s) for s in JPEG_SHAPES]}
    source = SyntheticJpegSource(jpegs, max(1_281_167, needed), spec.num_classes, seed)
  synth_s = time.perf_counter() - t0
  pipeline = pipeline_lib.InputPipeline(
      spec, source, batch_size=batch_size, eval_batch_size=batch_size, seed=seed,
      process_index=jax.process_index(), process_count=process_count)
  host_s, first_s = _time_batches(pipeline, warmup=warmup, batches=batches)
  local_batch = pipeline.local_batch
  result = {
      'dataset': dataset, 'global_batch': batch_size, 'local_batch': local_batch,
      'batches': batches, 'host_batch_ms': host_s * 1e3,
      'images_per_s_per_host': local_batch / host_s, 'first_batch_s': first_s,
      'synthesis_s': synth_s, 'cpu_cores': os.cpu_count(), **extra}
  if with_device:
    mesh = state_lib.make_mesh()
    sharding = state_lib.batch_sharded(mesh)
    put = lambda it: data.to_global_arrays(it, sharding, prefetch=2)
    dev_s, _ = _time_batches(pipeline, warmup=warmup, batches=batches, device_put=put)
    result.update(device_batch_ms=dev_s * 1e3,
                  images_per_s_per_host_to_device=local_batch / dev_s)
  return result
