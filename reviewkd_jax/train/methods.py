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
- `prepare(config, spec, *, teacher, teacher_variables, train_labels) -> constants`
  (optional): host arrays computed once per run, after the teacher is loaded (OFD's margins
  from the teacher's BatchNorms, CRD's class index of the training labels);
  `train_labels` are the whole training split's labels in dataset-index order, or None for
  a streamed dataset. The jitted step closes over them and hands them over as
  `ctx.constants`.
- `apply_kwargs(ctx) -> dict` (optional): extra keyword arguments of the trainable module's
  `apply` in the train step, computed from `ctx` before the student runs
  (`ctx.student_out` is None): e.g. the teacher's features and the batch's dataset indices
  for CRD's heads. The module must also initialise and evaluate without them.

`register_method(Method(...))` adds one; `get_method(name)` looks it up. The comparison
methods (kd, fitnet, at, pkt, rkd, crd, vid, ofd, dkd) are registered by
`comparison_methods`, imported at the end of this module.
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
  constants: Any = None       # the method's `prepare` output for this run


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


def logit_kd_terms(ctx: LossContext) -> tuple[dict, dict]:
  """Returns `({'kd': kd_weight * KD}, {'kd': KD})`, the optional logit term, or ({}, {})."""
  if not ctx.config.kd_weight:
    return {}, {}
  kd = losses.kd_loss(ctx.student_out[0], ctx.teacher_out[0],
                      temperature=ctx.config.kd_temperature)
  return {'kd': ctx.config.kd_weight * kd}, {'kd': kd}


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
  _, fused, _ = ctx.student_out
  _, teacher_features = ctx.teacher_out
  hcl = losses.hcl(fused, reviewkd.review_features(teacher_features, config.teacher_features))
  lam = config.reviewkd_weight * schedules.warmup_factor(ctx.epoch,
                                                         config.reviewkd_warmup_epochs)
  kd_terms, kd_logs = logit_kd_terms(ctx)
  return {'hcl': lam * hcl, **kd_terms}, {'hcl': hcl, 'lambda': lam, **kd_logs}


def _check_reviewkd(config):
  for field in ('student_features', 'teacher_features'):
    if config[field] not in reviewkd.FEATURE_KINDS:
      raise ValueError(f'config.{field} must be one of {reviewkd.FEATURE_KINDS}, got '
                       f'{config[field]!r}.')


def student_variables(variables: dict) -> dict:
  """Returns the `student` submodule's variables from every collection that has them."""
  return {col: tree['student'] for col, tree in variables.items() if 'student' in tree}


register_method(Method(
    name='reviewkd', uses_teacher=True, build=_build_reviewkd, loss_terms=_reviewkd_loss_terms,
    backbone=lambda module: module.student, backbone_variables=student_variables,
    check_config=_check_reviewkd))


def total_loss(terms: dict[str, jax.Array]) -> jax.Array:
  """Returns the float32 sum of the weighted loss terms."""
  return sum((t.astype(jnp.float32) for t in terms.values()), jnp.zeros((), jnp.float32))


# Registers the comparison methods; imported last, as it builds on the definitions above.
from reviewkd_jax.train import comparison_methods  # noqa: E402,F401  pylint: disable=all
