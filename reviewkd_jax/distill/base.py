"""The contract every training method follows, the registry, and what methods share.

A method is a `Method` registered under its name (`config.method`):

- `build(config, spec, dtype) -> (trainable module, teacher module or None)`, `spec` the
  dataset's `DatasetSpec` (image shape, number of classes, training-set size). The trainable
  module holds the student backbone and the method's own trainable parts (ABFs, regressors,
  embedding heads); `apply(variables, x, train=...)` returns a `ModelOutput` (the network
  alone) or a `DistillOutput`, both with `.logits`. Non-parameter collections it creates
  (`batch_stats`, a memory bank) are carried in the train state, updated every step and
  checkpointed. The teacher is never part of it: it stays frozen and out of the optimizer.
- `loss_terms(ctx: LossContext) -> (terms, logs)`: `terms` are weighted scalar losses added
  to `ce_weight * CE` (each is logged as `loss_<name>`); `logs` are extra scalars to log
  (unweighted losses, the current lambda). Both are computed in float32 inside the jitted
  step; anything epoch-dependent must use `ctx.epoch` (a traced array), never Python
  numbers, so the step compiles once.
- `backbone(module)` / `backbone_variables(variables)`: the plain student inside the
  trainable module (for evaluation and for the exported best/final models).
- `check_config(config)`: raise ValueError with a message saying what to change.
- `prepare(config, spec, *, teacher, teacher_variables, train_labels) -> constants`
  (optional): host arrays computed once per run, after the teacher is loaded (OFD's margins,
  CRD's class index); `train_labels` are the training split's labels in dataset-index order,
  or None for a streamed dataset. The jitted step closes over them: `ctx.constants`.
- `run_fields` (optional): config fields, besides the trainer's own, that make two runs of
  this method different experiments, each with the value a checkpoint that does not record
  it implies (ReviewKD's ablation switches). A workdir is only resumed by a config that
  agrees on them.
- `apply_kwargs(ctx) -> dict` (optional): extra keyword arguments of the trainable module's
  `apply` in the train step, computed before the student runs (`ctx.student_out` is None):
  e.g. the teacher's features and the batch's dataset indices for CRD. The module must also
  initialise and evaluate without them.

This module imports no method; `reviewkd_jax.distill` imports every method module, each of
which registers itself with `register_method`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from reviewkd_jax import losses
from reviewkd_jax.models import ModelOutput, create_model


class DistillOutput(NamedTuple):
  """What a distillation method's trainable module returns.

  `adapter` is what the method's adapter (its trainable part beside the student) computes
  from the student's features (ReviewKD: the ABF outputs shallow to deep; FitNet: the
  regressed hint; None for methods without trainable parts).
  """
  logits: jax.Array
  features: dict
  adapter: Any = None

  @property
  def head(self) -> Any:
    """The former name of `adapter`, kept for one release."""
    return self.adapter


@dataclasses.dataclass(frozen=True)
class LossContext:
  """Everything a method's loss may use inside the train step."""
  config: ml_collections.ConfigDict
  student_out: DistillOutput | ModelOutput | None  # the trainable module's output
  teacher_out: ModelOutput | None  # the frozen teacher's output (no gradient), or None
  images: jax.Array                # normalised input
  batch: dict                      # 'image', 'label', 'index' (dataset index, -1 if unknown)
  epoch: jax.Array                 # 0-based epoch of this step (int32, traced)
  rng: jax.Array                   # a key for this step
  constants: Any = None            # the method's `prepare` output for this run

  def constant(self, name: str):
    """Returns `constants[name]`, or raises if the step was built without `prepare`."""
    if self.constants is None:
      raise ValueError(f'config.method={self.config.method!r} needs its per-run constants: '
                       'build the step with constants=method.prepare(...).')
    return self.constants[name]


def _identity(x):
  return x


def _no_check(config):
  del config


def _no_constants(config, spec, **run):
  del config, spec, run


def _no_apply_kwargs(ctx):
  del ctx
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method; see the module docstring for the contract of each field."""
  name: str
  uses_teacher: bool
  build: Callable[[ml_collections.ConfigDict, Any, Any], tuple[nn.Module, nn.Module | None]]
  loss_terms: Callable[[LossContext], tuple[dict, dict]]
  backbone: Callable[[nn.Module], nn.Module] = _identity
  backbone_variables: Callable[[dict], dict] = _identity
  check_config: Callable[[ml_collections.ConfigDict], None] = _no_check
  prepare: Callable[..., Any] = _no_constants
  apply_kwargs: Callable[[LossContext], dict] = _no_apply_kwargs
  run_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Registry:
  """Named entries (`entry.name`), registered once each; a lookup of an unknown name raises
  ValueError with the message `unknown(name, known names)`. The detection methods use one
  too (`detection/methods/base.py`)."""

  def __init__(self, kind: str, unknown: Callable[[str, list[str]], str]):
    self.kind = kind
    self.entries: dict[str, Any] = {}
    self._unknown = unknown

  def register(self, entry):
    """Registers `entry` under `entry.name` and returns it."""
    if entry.name in self.entries:
      raise ValueError(f'{self.kind} {entry.name!r} registered twice')
    self.entries[entry.name] = entry
    return entry

  def names(self) -> list[str]:
    """Returns the sorted registered names."""
    return sorted(self.entries)

  def get(self, name: str):
    """Returns the entry registered as `name`, or raises ValueError listing the known ones."""
    if name not in self.entries:
      raise ValueError(self._unknown(name, self.names()))
    return self.entries[name]


_REGISTRY = Registry('method', lambda name, known: (
    f'Unknown method {name!r} (config.method). Known methods: {", ".join(known)}.'))
_METHODS: dict[str, Method] = _REGISTRY.entries


def register_method(method: Method) -> Method:
  """Registers `method` under `method.name` and returns it."""
  return _REGISTRY.register(method)


def list_methods() -> list[str]:
  """Returns the sorted names of the registered methods."""
  return _REGISTRY.names()


def get_method(name: str) -> Method:
  """Returns the method registered as `name`, or raises ValueError listing the known ones."""
  return _REGISTRY.get(name)


def total_loss(terms: dict[str, jax.Array]) -> jax.Array:
  """Returns the float32 sum of the weighted loss terms."""
  return sum((t.astype(jnp.float32) for t in terms.values()), jnp.zeros((), jnp.float32))


# --- What the distillation methods share ----------------------------------------------------

def warmup_factor(epoch: jax.Array | int, warmup_epochs: float) -> jax.Array:
  """Returns `min(1, epoch / warmup_epochs)` (1 when `warmup_epochs` is 0), float32.

  `epoch` is 0-based and constant within an epoch, as in the authors' CIFAR script.
  """
  if not warmup_epochs:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(epoch, jnp.float32) / warmup_epochs)


def logit_kd_terms(ctx: LossContext) -> tuple[dict, dict]:
  """Returns `({'kd': kd_weight * KD}, {'kd': KD})`, the optional logit term, or ({}, {})."""
  if not ctx.config.kd_weight:
    return {}, {}
  kd = losses.kd_loss(ctx.student_out.logits, ctx.teacher_out.logits,
                      temperature=ctx.config.kd_temperature)
  return {'kd': ctx.config.kd_weight * kd}, {'kd': kd}


def with_logit_kd(term_fn: Callable[[LossContext], tuple[dict, dict]]):
  """Returns `loss_terms` that adds the optional logit KD term to `term_fn`'s."""

  def loss_terms(ctx: LossContext) -> tuple[dict, dict]:
    terms, logs = term_fn(ctx)
    kd_terms, kd_logs = logit_kd_terms(ctx)
    return {**terms, **kd_terms}, {**logs, **kd_logs}

  return loss_terms


def student_variables(variables: dict) -> dict:
  """Returns the `student` submodule's variables from every collection that has them."""
  return {col: tree['student'] for col, tree in variables.items() if 'student' in tree}


def check_kd_weight(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a negative `kd_weight`."""
  if config.kd_weight < 0:
    raise ValueError(f'config.kd_weight must be >= 0, got {config.kd_weight}.')


def benchmark_features(features: dict, *, preact: bool = False) -> list:
  """Returns the CRD benchmark's `feat` list `[stem, *stages, pooled]` of a backbone's features.

  With `preact`, the stages are the pre-ReLU maps (RepDistiller's `preact=True`).
  """
  stages = features['preact'] if preact else features['stages']
  return [features['stem'], *stages, features['pooled']]


def feature_shapes(model: nn.Module, image_shape: Sequence[int]) -> dict:
  """Returns the ShapeDtypeStructs of `model`'s features for one image (shape inference).

  One trace per network: the result is kept for equal modules (Flax modules compare and hash
  by their fields), so a config's teacher, traced again by every method or ablation that
  distils from it, is traced once per process. A module with an unhashable field is traced
  each time.
  """
  image_shape = tuple(int(d) for d in image_shape)
  try:
    hash(model)
  except TypeError:
    return _trace_feature_shapes(model, image_shape)
  return jax.tree.map(lambda s: s, _cached_feature_shapes(model, image_shape))  # own containers


def _trace_feature_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  out, _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  return out.features


_cached_feature_shapes = functools.lru_cache(maxsize=128)(_trace_feature_shapes)


def check_stage_pairs(name: str, config, student: dict, teacher: dict, kind: str) -> None:
  """Raises ValueError unless student and teacher features have as many `kind` maps."""
  if len(student[kind]) != len(teacher[kind]):
    raise ValueError(
        f'{name} pairs the stages one to one, but {config.model} has {len(student[kind])} and '
        f'{config.teacher} {len(teacher[kind])}: choose networks with as many stages.')


class DistillStudent(nn.Module):
  """The student backbone plus a method's adapter; returns a `DistillOutput`.

  The adapter, the field `head` (the name its variables have in the parameter tree and in
  saved checkpoints, `params['head']`), is called as `head(features, train=...,
  **adapter_inputs)` with the keyword inputs of the train step (`Method.apply_kwargs`); it
  is None for a method without one.
  """
  student: nn.Module
  head: nn.Module | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, **adapter_inputs) -> DistillOutput:
    """Returns the student's logits and features and the adapter's output."""
    logits, features = self.student(x, train=train)
    out = None if self.head is None else self.head(features, train=train, **adapter_inputs)
    return DistillOutput(logits, features, out)


AdapterFn = Callable[..., 'nn.Module | None']


def register_adapter_method(name: str, adapter_fn: AdapterFn | None, term_fn: Callable,
                            check: Callable | None = None, **extra) -> Method:
  """Registers a method that trains `DistillStudent(student, adapter_fn(...))` from a teacher.

  `adapter_fn(config, spec, dtype, student_features, teacher_features)` gets the two
  networks' feature shapes and returns the adapter module (or None, after checking that the
  pair suits the method); `adapter_fn=None`: no adapter. `term_fn(ctx)` returns the method's
  terms, to which the optional logit KD term is added; `check(config)` its config checks.
  """

  def build(config, spec, dtype):
    teacher = create_model(config.teacher, num_classes=spec.num_classes, dtype=dtype)
    student = create_model(config.model, num_classes=spec.num_classes, dtype=dtype)
    adapter = None
    if adapter_fn is not None:
      adapter = adapter_fn(config, spec, dtype, feature_shapes(student, spec.image_shape),
                           feature_shapes(teacher, spec.image_shape))
    return DistillStudent(student, adapter), teacher

  def check_config(config):
    check_kd_weight(config)
    if check is not None:
      check(config)

  return register_method(Method(
      name=name, uses_teacher=True, build=build, loss_terms=with_logit_kd(term_fn),
      backbone=lambda module: module.student, backbone_variables=student_variables,
      check_config=check_config, **extra))
