"""One run setup: config -> method, modules, optimizer, train state and the jitted steps.

The trainer, the benchmark and the tests build a run through `build_run`, so a step that is
timed or tested is the step that trains.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from reviewkd_jax import data
from reviewkd_jax import distill
from reviewkd_jax.models import create_model
from reviewkd_jax.train import schedules
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import step as step_lib
from reviewkd_jax.train.run_core import check_batch_divides, check_counts

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None
                 ) -> distill.Method:
  """Returns the config's method after checking names and combinations, before any work.

  With `mesh`, also that its devices divide the batch sizes.
  """
  data.get_spec(config.dataset)
  method = distill.get_method(config.method)
  create_model(config.model)  # raises the registry's ValueError for an unknown name
  method.check_config(config)
  if method.uses_teacher:
    if not config.teacher:
      raise ValueError(f'config.method={config.method!r} distils from a teacher: set '
                       '--config.teacher=NAME.')
    create_model(config.teacher)
  if config.teacher_bn_mode not in step_lib.TEACHER_BN_MODES:
    raise ValueError(f'config.teacher_bn_mode must be one of {step_lib.TEACHER_BN_MODES}, got '
                     f'{config.teacher_bn_mode!r}.')
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}.')
  check_counts(config, at_least_one=('num_epochs', 'batch_size', 'eval_batch_size',
                                      'log_every_steps', 'eval_every_epochs',
                                      'checkpoint_every_epochs'),
               at_least_zero=('train_subset', 'keep_checkpoints', 'checkpoint_every_steps', 'stop_after_step'))
  if mesh is not None:
    check_batch_divides(config, mesh.size)
  return method


def make_classifier_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (PyTorch's SGD, `state.pytorch_sgd`, at the lr schedule; the schedule), the lr
  decaying at epochs (`schedules.classifier_lr_schedule`)."""
  schedule = schedules.classifier_lr_schedule(
      state_lib.base_learning_rate(config), steps_per_epoch=steps_per_epoch,
      decay_epochs=config.lr_decay_epochs, decay_factor=config.lr_decay_factor)
  tx = state_lib.pytorch_sgd(schedule, weight_decay=config.weight_decay,
                             momentum=config.momentum, nesterov=config.nesterov)
  return tx, schedule


@dataclasses.dataclass
class RunSetup:
  """The parts of one run that follow from its config, its dataset and its mesh."""
  config: ml_collections.ConfigDict
  method: distill.Method
  spec: data.DatasetSpec
  mesh: Mesh
  steps_per_epoch: int
  model: nn.Module              # the trainable module (student + the method's parts)
  teacher: nn.Module | None     # the frozen teacher, or None
  backbone: nn.Module           # the plain student inside `model` (evaluated, exported)
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule

  def init_state(self) -> state_lib.TrainState:
    """Returns a fresh TrainState for `model`, replicated over the mesh."""
    return state_lib.create_train_state(self.model, self.tx, seed=self.config.seed,
                                        input_shape=self.spec.image_shape, mesh=self.mesh)

  def train_step(self, constants: Any = None):
    """Returns the jitted `train_step(state, batch, teacher_variables)`; see `step`."""
    return step_lib.make_classifier_train_step(
        model=self.model, teacher=self.teacher, method=self.method, config=self.config,
        tx=self.tx, lr_schedule=self.lr_schedule, steps_per_epoch=self.steps_per_epoch,
        spec=self.spec, mesh=self.mesh, constants=constants)

  def eval_step(self, module: nn.Module | None = None):
    """Returns the jitted eval step of `module` (default: the backbone)."""
    return step_lib.make_eval_step(self.backbone if module is None else module, self.spec,
                                   self.mesh)

  def backbone_variables(self, state: state_lib.TrainState) -> dict:
    """Returns the plain student's variables inside `state`."""
    return self.method.backbone_variables({'params': state.params, **state.model_state})


def build_run(config: ml_collections.ConfigDict, spec: data.DatasetSpec, *, mesh: Mesh,
              steps_per_epoch: int) -> RunSetup:
  """Returns the run's setup; raises ValueError for a config or mesh that cannot run.

  `spec` is the dataset's, with `num_train` set to this run's training-set size where the
  method needs it (CRD's memory bank).
  """
  method = check_config(config, mesh)
  model, teacher = method.build(config, spec, DTYPES[config.dtype])
  tx, lr_schedule = make_classifier_optimizer(config, steps_per_epoch)
  return RunSetup(config=config, method=method, spec=spec, mesh=mesh,
                  steps_per_epoch=steps_per_epoch, model=model, teacher=teacher,
                  backbone=method.backbone(model), tx=tx, lr_schedule=lr_schedule)
