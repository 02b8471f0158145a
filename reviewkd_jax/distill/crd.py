"""'crd': contrastive representation distillation (Tian et al., ICLR 2020) on the pooled
embeddings (`feat[-1]`), as the CRD benchmark runs it: embedding heads, a momentum memory
bank and NCE against K negatives; `losses.crd_loss`, weight `crd_weight` (0.8),
`crd_feat_dim` 128, `crd_num_negatives` 16384, `crd_temperature` 0.07, `crd_momentum` 0.5.

Negatives: RepDistiller's CIFAR loader (`CIFAR100InstanceSample`, mode 'exact', the default of
its train_student.py) draws each example's negatives from the training examples of *other
classes*; that produced the published numbers, so `crd_negatives='other_class'` is the
default ('uniform' is ContrastMemory's own sampler over all examples). Two differences:
RepDistiller draws without replacement (16384 of ~49500), we draw with replacement (the same
distribution per negative; ~15% repeats), and the bank has one row per training example of
*this run*, so tiny datasets (mock data, `train_subset`) clip the negatives to
(examples - 1), with a warning. CRD needs dataset indices: in-memory datasets only.

The memory bank lives in the non-trainable variable collection `'memory'`:
`memory_v1` (student embeddings) and `memory_v2` (teacher embeddings), each
(num_data, feat_dim), and `z` (2,), the NCE normalisation constants (-1 until the first
training batch sets them). Apply with `mutable=['memory']` during training to get the
updated bank; without it the bank is read only. It is ordinary pytree state, so it goes
into checkpoints beside the parameters.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reviewkd_jax import losses
from reviewkd_jax.distill import base
from reviewkd_jax.models import layers

MEMORY = 'memory'


def _normalize_rows(x: jax.Array) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class Embed(nn.Module):
  """CRD's `Embed`: a linear layer (PyTorch init) then l2 normalisation, (N, ...) -> (N, D)."""
  dim_out: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the unit-norm (N, dim_out) embedding of `x` (flattened per example)."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    return _normalize_rows(layers.linear(self.dim_out, x.shape[-1], name='linear')(x))


def uniform_contrast_idx(key: jax.Array, idx: jax.Array, *, num_data: int,
                         num_negatives: int = 16384) -> jax.Array:
  """Returns (B, K+1) indices: column 0 is `idx`, the rest uniform over the dataset.

  This is `ContrastMemory`'s own sampler (uniform unigrams; a negative may equal the
  positive).
  """
  neg = jax.random.randint(key, (idx.shape[0], num_negatives), 0, num_data, dtype=jnp.int32)
  return jnp.concatenate([idx.astype(jnp.int32)[:, None], neg], axis=1)


class ClassIndex(NamedTuple):
  """Dataset indices sorted by label, with each class's start and count in that order."""
  order: np.ndarray
  starts: np.ndarray
  counts: np.ndarray


def class_index(dataset_labels) -> ClassIndex:
  """Returns the `ClassIndex` of a dataset's integer labels (computed once, on the host)."""
  labels = np.asarray(dataset_labels).reshape(-1)
  order = np.argsort(labels, kind='stable').astype(np.int32)
  num_classes = int(labels.max()) + 1
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  starts = (np.cumsum(counts) - counts).astype(np.int32)
  return ClassIndex(order, starts, counts)


def other_class_contrast_idx(key: jax.Array, idx: jax.Array, labels: jax.Array,
                             index: ClassIndex, *, num_negatives: int = 16384) -> jax.Array:
  """Returns (B, K+1) indices: column 0 is `idx`, negatives uniform over other classes.

  This is the CRD benchmark's sampler (`CIFAR100InstanceSample`, mode 'exact'): each
  negative is drawn with replacement from the examples whose label differs from `labels`.
  """
  order, starts, counts = (jnp.asarray(a) for a in index)
  n = order.shape[0]
  start = starts[labels][:, None]
  count = counts[labels][:, None]
  # Uniform position among the n - count other-class slots of `order`, skipping the block
  # of the example's own class.
  r = jax.random.randint(key, (idx.shape[0], num_negatives), 0, n - count, dtype=jnp.int32)
  r = jnp.where(r >= start, r + count, r)
  return jnp.concatenate([idx.astype(jnp.int32)[:, None], order[r]], axis=1)


class ContrastMemory(nn.Module):
  """CRD's memory bank: scores against stored embeddings, then momentum updates.

  Call with `v1` (student, (B, D)), `v2` (teacher, (B, D)) unit embeddings, `idx` (B,) the
  batch's dataset indices and `contrast_idx` (B, K+1) (column 0 the positive). Returns
  `(out_v1, out_v2)`: `out_v1 = exp(memory_v2[contrast_idx] . v1 / T) / Z_v1` and
  symmetrically, each (B, K+1). Z is `mean(exp(.)) * num_data` of the first training batch.
  When `'memory'` is mutable (and not initialising), rows `idx` become
  `normalize(momentum * row + (1 - momentum) * v)`, after the scores used the old rows.
  """
  num_data: int
  feat_dim: int = 128
  temperature: float = 0.07
  momentum: float = 0.5

  @nn.compact
  def __call__(self, v1: jax.Array, v2: jax.Array, idx: jax.Array,
               contrast_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the (B, K+1) scores `(out_v1, out_v2)`; column 0 is the positive pair."""
    stdv = 1.0 / math.sqrt(self.feat_dim / 3)

    def init_bank():
      key = self.make_rng('params')
      return jax.random.uniform(key, (self.num_data, self.feat_dim), jnp.float32,
                                -stdv, stdv)

    mem_v1 = self.variable(MEMORY, 'memory_v1', init_bank)
    mem_v2 = self.variable(MEMORY, 'memory_v2', init_bank)
    z = self.variable(MEMORY, 'z', lambda: jnp.full((2,), -1.0, jnp.float32))

    v1 = v1.astype(jnp.float32)
    v2 = v2.astype(jnp.float32)
    bank_v1 = jax.lax.stop_gradient(mem_v1.value)
    bank_v2 = jax.lax.stop_gradient(mem_v2.value)

    def scores(bank, v):
      # Row b of `v` against every bank row, then picked at contrast_idx[b]: the same dot
      # products as gathering (B, K+1, D) rows, without materialising them.
      dots = jnp.matmul(v, bank.T, precision=jax.lax.Precision.HIGHEST)  # (B, num_data)
      return jnp.exp(jnp.take_along_axis(dots, contrast_idx, axis=1) / self.temperature)

    out_v2 = scores(bank_v1, v2)
    out_v1 = scores(bank_v2, v1)
    estimate = jax.lax.stop_gradient(
        jnp.stack([jnp.mean(out_v1), jnp.mean(out_v2)]) * self.num_data)
    z_now = jnp.where(z.value < 0, estimate, z.value)
    out_v1 = out_v1 / z_now[0]
    out_v2 = out_v2 / z_now[1]

    if self.is_mutable_collection(MEMORY) and not self.is_initializing():
      z.value = z_now
      m = self.momentum

      def update(bank, v):
        rows = m * jnp.take(bank, idx, axis=0) + (1.0 - m) * jax.lax.stop_gradient(v)
        return bank.at[idx].set(_normalize_rows(rows))

      mem_v1.value = update(bank_v1, v1)
      mem_v2.value = update(bank_v2, v2)
    return out_v1, out_v2


class CRDHead(nn.Module):
  """CRD's trainable part: student and teacher `Embed`s plus the `ContrastMemory`.

  Call with the student's and teacher's pooled features (`feat[-1]`, (B, Cs) and (B, Ct)),
  the batch's dataset indices `idx` (B,) and `contrast_idx` (B, K+1) from
  `other_class_contrast_idx` (the benchmark's sampler) or `uniform_contrast_idx`. Returns
  `(student_scores, teacher_scores)` for `losses.crd_loss`. The teacher feature gets no
  gradient; the teacher's embedding head does (it is trained).
  """
  num_data: int
  feat_dim: int = 128
  temperature: float = 0.07
  momentum: float = 0.5

  @nn.compact
  def __call__(self, student_feat: jax.Array, teacher_feat: jax.Array, idx: jax.Array,
               contrast_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the (B, K+1) NCE scores anchored on the student and on the teacher."""
    v1 = Embed(self.feat_dim, name='embed_s')(student_feat)
    v2 = Embed(self.feat_dim, name='embed_t')(jax.lax.stop_gradient(teacher_feat))
    return ContrastMemory(self.num_data, self.feat_dim, self.temperature, self.momentum,
                          name='contrast')(v1, v2, idx, contrast_idx)


CRD_NEGATIVES = ('other_class', 'uniform')


class CRDStudentHead(nn.Module):
  """CRD's embeddings and memory bank on the pooled features, sampling its own negatives.

  Training passes `teacher_pooled`, the batch's dataset `index` and `labels`, a `key` and,
  for `negatives='other_class'`, the training set's `class_index`. Without them it
  initialises on placeholders, or (outside initialisation) returns None: the module then is
  the backbone alone.
  """
  num_data: int
  teacher_dim: int
  negatives: str = 'other_class'
  feat_dim: int = 128
  num_negatives: int = 16384
  temperature: float = 0.07
  momentum: float = 0.5

  @nn.compact
  def __call__(self, features: dict, train: bool, *, teacher_pooled=None, index=None,
               labels=None, key=None, class_index=None):
    """Returns the (B, K+1) NCE scores `(student-anchored, teacher-anchored)`, or None."""
    del train  # the bank updates whenever the 'memory' collection is mutable
    pooled = features['pooled']
    if teacher_pooled is None:
      if not self.is_initializing():
        return None
      b = pooled.shape[0]
      teacher_pooled = jnp.zeros((b, self.teacher_dim), jnp.float32)
      index = jnp.zeros((b,), jnp.int32)
      contrast_idx = jnp.zeros((b, self.num_negatives + 1), jnp.int32)
    elif self.negatives == 'other_class':
      contrast_idx = other_class_contrast_idx(key, index, labels, class_index,
                                              num_negatives=self.num_negatives)
    else:
      contrast_idx = uniform_contrast_idx(key, index, num_data=self.num_data,
                                          num_negatives=self.num_negatives)
    return CRDHead(self.num_data, self.feat_dim, self.temperature, self.momentum,
                   name='crd')(pooled, teacher_pooled, index, contrast_idx)


def _sizes(config, spec) -> tuple[int, int]:
  """Returns CRD's (num_data, num_negatives): the bank's rows and the clipped K."""
  if spec.num_train < 2:
    raise ValueError(f'CRD needs the training-set size of {spec.name!r} (got '
                     f'{spec.num_train}) for its memory bank.')
  return spec.num_train, min(config.crd_num_negatives, spec.num_train - 1)


def _adapter(config, spec, dtype, student, teacher):
  del dtype, student
  num_data, num_negatives = _sizes(config, spec)
  if num_negatives < config.crd_num_negatives:
    logging.warning('CRD: %s has %d training examples, fewer than crd_num_negatives=%d + 1; '
                    'using %d negatives per example (expected only for tiny or mock data).',
                    spec.name, num_data, config.crd_num_negatives, num_negatives)
  return CRDStudentHead(num_data, teacher['pooled'].shape[-1], config.crd_negatives,
                        feat_dim=config.crd_feat_dim, num_negatives=num_negatives,
                        temperature=config.crd_temperature, momentum=config.crd_momentum)


def _terms(ctx: base.LossContext):
  student_scores, teacher_scores = ctx.student_out.adapter
  return {'crd': losses.crd_loss(student_scores, teacher_scores,
                                 num_data=ctx.constant('num_data'),
                                 weight=ctx.config.crd_weight)}, {}


def _check(config):
  if config.crd_negatives not in CRD_NEGATIVES:
    raise ValueError(f'config.crd_negatives must be one of {CRD_NEGATIVES}, got '
                     f'{config.crd_negatives!r}.')
  if config.crd_num_negatives < 1:
    raise ValueError(f'config.crd_num_negatives must be >= 1, got {config.crd_num_negatives}.')


def _prepare(config, spec, *, teacher, teacher_variables, train_labels):
  """Returns {'num_data', 'class_index' (other-class negatives)} for CRD's steps."""
  del teacher, teacher_variables
  if train_labels is None:
    raise ValueError(
        f'CRD keeps one memory-bank row per training example and needs each example\'s '
        f'dataset index, which the streamed {spec.name!r} pipeline does not provide: use an '
        'in-memory dataset (cifar100, digits) or another config.method.')
  num_data, _ = _sizes(config, spec)
  if len(train_labels) != num_data:
    raise ValueError(f'CRD: {len(train_labels)} training labels for a bank of {num_data}.')
  index = class_index(train_labels) if config.crd_negatives == 'other_class' else None
  return {'num_data': num_data, 'class_index': index}


def _apply_kwargs(ctx: base.LossContext) -> dict:
  return {'teacher_pooled': ctx.teacher_out.features['pooled'], 'index': ctx.batch['index'],
          'labels': ctx.batch['label'], 'key': ctx.rng,
          'class_index': ctx.constant('class_index')}


base.register_adapter_method('crd', _adapter, _terms, _check, prepare=_prepare,
                             apply_kwargs=_apply_kwargs)
