"""Training methods by name: what each adds to the student and the loss terms it computes.

Extension point. A method is a `Method` registered under its name (`config.method`):

- `build(config, spec, dtype) -> (trainable module, teacher module or None)`, `spec` the
  dataset's `DatasetSpec` (image shape, number of classes). The
  trainable module holds the student backbone and the method's own trainable parts (ABFs,
  regressors, embedding heads); its `apply(variables, x, train=...)` returns a tuple whose
  first element is the logits. Non-parameter collections it creates (`batch_stats`, a
  memory bank) are carried in `TrainState.model_state`, updated every step and
  checkpointed. The teacher is never part of it: it stays frozen and out of the optimizer.
- `loss_terms(ctx: LossContext) -> (terms, logs)`: `terms` are weighted scalar losses added
  to `ce_weight * CE` (each is logged as `loss_<name>`); `logs` are extra scalars to log
  (unweighted losses, the current lambda). Both are computed in float32 inside the jitted
  step; anything epoch-dependent must use `ctx.epoch` (a traced array), never Python
  numbers, so the step compiles once.
- `backbone_variables(variables)`: the plain student's variables inside the trainable
  module's (for evaluation and for the exported best/final models); `backbone(module)` the
  matching module.
- `check_config(config)`: raise ValueError with a message saying what to change.

`register_method(Method(...))` adds one; `get_method(name)` looks it up.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from reviewkd_jax import losses
from reviewkd_jax import reviewkd
from reviewkd_jax.models import create_model
from reviewkd_jax.train import schedules


@dataclasses.dataclass(frozen=True)
class LossContext:
  """Everything a method's loss may use inside the train step."""
  config: ml_collections.ConfigDict
  student_out: tuple          # the trainable module's output; [0] is the logits
  teacher_out: Any            # (logits, features) of the frozen teacher, or None
  images: jax.Array           # normalised input
  batch: dict                 # 'image', 'label', 'index' (dataset index, -1 if unknown)
  epoch: jax.Array            # 0-based epoch of this step (int32, traced)
  rng: jax.Array              # a key for this step


def _identity(x):
  return x


def _no_check(config):
  del config


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


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  """Registers `method` under `method.name` and returns it."""
  if method.name in _METHODS:
    raise ValueError(f'method {method.name!r} registered twice')
  _METHODS[method.name] = method
  return method


def list_methods() -> list[str]:
  """Returns the sorted names of the registered methods."""
  return sorted(_METHODS)


def get_method(name: str) -> Method:
  """Returns the method registered as `name`, or raises ValueError listing the known ones."""
  if name not in _METHODS:
    raise ValueError(f'Unknown method {name!r} (config.method). Known methods: '
                     f'{", ".join(list_methods())}.')
  return _METHODS[name]


# --- 'none': the network alone (teachers and student baselines) ----------------------------

def _build_alone(config, spec, dtype):
  return create_model(config.model, num_classes=spec.num_classes, dtype=dtype), None


def _check_alone(config):
  if config.teacher or config.teacher_checkpoint:
    raise ValueError(
        "config.method='none' trains config.model alone, but config.teacher/"
        'teacher_checkpoint are set: clear them, or choose a distillation method '
        f'(config.method, one of {", ".join(m for m in list_methods() if m != "none")}).')


register_method(Method(name='none', uses_teacher=False, build=_build_alone,
                       loss_terms=lambda ctx: ({}, {}), check_config=_check_alone))


# --- 'reviewkd': Chen et al., CVPR 2021 -----------------------------------------------------

def _build_reviewkd(config, spec, dtype):
  return reviewkd.build_reviewkd(
      config.model, config.teacher, num_classes=spec.num_classes, image_size=spec.image_size,
      mid_channels=config.mid_channels or None, student_features=config.student_features,
      teacher_features=config.teacher_features, dtype=dtype)


def _reviewkd_loss_terms(ctx: LossContext):
  config = ctx.config
  logits, fused, _ = ctx.student_out
  teacher_logits, teacher_features = ctx.teacher_out
  hcl = losses.hcl(fused, reviewkd.review_features(teacher_features, config.teacher_features))
  lam = config.reviewkd_weight * schedules.warmup_factor(ctx.epoch,
                                                         config.reviewkd_warmup_epochs)
  terms = {'hcl': lam * hcl}
  logs = {'hcl': hcl, 'lambda': lam}
  if config.kd_weight:
    kd = losses.kd_loss(logits, teacher_logits, temperature=config.kd_temperature)
    terms['kd'] = config.kd_weight * kd
    logs['kd'] = kd
  return terms, logs


def _check_reviewkd(config):
  for field in ('student_features', 'teacher_features'):
    if config[field] not in reviewkd.FEATURE_KINDS:
      raise ValueError(f'config.{field} must be one of {reviewkd.FEATURE_KINDS}, got '
                       f'{config[field]!r}.')


def _reviewkd_backbone_variables(variables):
  return {col: tree['student'] for col, tree in variables.items() if 'student' in tree}


register_method(Method(
    name='reviewkd', uses_teacher=True, build=_build_reviewkd, loss_terms=_reviewkd_loss_terms,
    backbone=lambda module: module.student, backbone_variables=_reviewkd_backbone_variables,
    check_config=_check_reviewkd))


def total_loss(terms: dict[str, jax.Array]) -> jax.Array:
  """Returns the float32 sum of the weighted loss terms."""
  return sum((t.astype(jnp.float32) for t in terms.values()), jnp.zeros((), jnp.float32))
