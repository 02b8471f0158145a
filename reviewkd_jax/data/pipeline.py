"""Batches for one process: deterministic from (seed, epoch), resumable mid-epoch.

Training: an epoch is `steps_per_epoch = num_train // global_batch` full batches
(`drop_remainder`). In-memory datasets (CIFAR-100, digits): every process draws the same
permutation of the whole training split from (seed, epoch); global batch s is the
permutation's positions [s * B, (s + 1) * B), process p takes its consecutive rows of it,
and the example at position k is augmented with the stateless seed (hash(seed, e), k). So
the global batch of every step (its examples, their order and their augmentation) is the
same whether 1, 2 or 8 processes load it. Streamed datasets (ImageNet): each process
shuffles and augments its own share of the files with hash(seed, e, p), so the batches
depend on the process count (still deterministic for a given count). Either way, starting
an epoch at step s yields exactly the batches an uninterrupted run sees from step s on.
Evaluation: every example exactly once, the last batch padded with `mask == 0` examples so
that every process runs the same number of steps.
"""
from __future__ import annotations

import collections
import math
from typing import Iterator

import jax
import numpy as np

from reviewkd_jax.data import preprocess
from reviewkd_jax.data.datasets import DatasetSpec
from reviewkd_jax.data.shares import derive_seed
from reviewkd_jax.lazy_imports import tf

Batch = dict[str, np.ndarray]


class InputPipeline:
  """Per-process training and evaluation batches (numpy) of one dataset source."""

  def __init__(self, spec: DatasetSpec, source, *, batch_size: int, eval_batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    for name, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
      if size % process_count:
        raise ValueError(f'config.{name}={size} must be divisible by the number of processes '
                         f'({process_count}); it is the global batch.')
    self.spec, self.source = spec, source
    self.seed, self.process_index, self.process_count = seed, process_index, process_count
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
    self.local_batch = batch_size // process_count
    self.local_eval_batch = eval_batch_size // process_count
    self.steps_per_epoch = source.num_train // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f'{spec.name} has {source.num_train} training examples, fewer than one '
                       f'global batch of {batch_size}: lower config.batch_size.')
    self.eval_steps = math.ceil(source.num_eval / eval_batch_size)
    self._train_fn = preprocess.train_fn(spec)
    self._eval_fn = preprocess.eval_fn(spec)

  @property
  def num_train(self) -> int:
    """Returns the number of training examples over all processes."""
    return self.source.num_train

  @property
  def num_eval(self) -> int:
    """Returns the number of evaluation examples over all processes."""
    return self.source.num_eval

  def epoch_seed(self, epoch: int) -> int:
    """Returns the 31-bit seed of the shuffle and augmentation in `epoch`: the same on every
    process for in-memory datasets, this process's own for streamed ones."""
    process = 0 if self.source.in_memory else self.process_index
    return derive_seed(self.seed, epoch, process)

  def global_rows(self, epoch: int, start_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (dataset indices, positions in the epoch) of this process's rows of the global
    batches of `epoch` from `start_step` on (in-memory datasets)."""
    order = np.random.default_rng(self.epoch_seed(epoch)).permutation(self.num_train)
    positions = np.arange(self.steps_per_epoch * self.batch_size).reshape(
        self.steps_per_epoch, self.process_count, self.local_batch)
    positions = positions[start_step:, self.process_index].reshape(-1)
    return order[positions], positions

  def train_dataset(self, epoch: int, start_step: int = 0) -> tf.data.Dataset:
    """Returns the batches of `epoch` from `start_step` on, as a tf.data pipeline."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f'start_step {start_step} outside [0, {self.steps_per_epoch}]')
    epoch_seed = self.epoch_seed(epoch)
    if self.source.in_memory:
      rows, positions = self.global_rows(epoch, start_step)
      ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(positions.astype(np.int64)),
                               self.source.train_examples_at(rows))
    else:
      ds = self.source.train_examples(epoch_seed)
      ds = ds.take(self.steps_per_epoch * self.local_batch).enumerate()
      ds = ds.skip(start_step * self.local_batch)

    def augment(position, example):
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), position])
      return {**example, 'image': self._train_fn(example['image'], seed)}

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """Yields this process's numpy batches of `epoch` from `start_step` on."""
    yield from self.train_dataset(epoch, start_step).as_numpy_iterator()

  def eval_dataset(self) -> tf.data.Dataset:
    """Returns `eval_steps` padded batches with a 0/1 `mask` (1 = real example)."""
    ds = self.source.eval_examples().map(
        lambda ex: {'image': self._eval_fn(ex['image']), 'label': ex['label'],
                    'mask': tf.constant(1, tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = tf.data.Dataset.from_tensors({
        'image': tf.zeros(self.spec.image_shape, tf.uint8), 'label': tf.constant(0, tf.int32),
        'mask': tf.constant(0, tf.int32)}).repeat()
    ds = ds.concatenate(pad).take(self.eval_steps * self.local_eval_batch)
    return ds.batch(self.local_eval_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def eval_batches(self) -> Iterator[Batch]:
    """Yields this process's padded numpy evaluation batches."""
    yield from self.eval_dataset().as_numpy_iterator()


def to_global_arrays(batches, sharding: jax.sharding.Sharding, *, prefetch: int = 2):
  """Yields `batches` as global jax.Arrays laid out by `sharding`, `prefetch` steps ahead.

  Each process passes its local batches; the leading axis of the result is the global batch.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
