"""The train state, the optimizer and the device mesh."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reviewkd_jax.train import schedules

DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training and is checkpointed (the teacher is not).

  `params` are the trainable module's parameters (student + the method's parts);
  `model_state` its other variable collections (`batch_stats`, ...); `rng` a raw uint32 key,
  folded with `step` in every step.
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array


def make_mesh(devices=None) -> Mesh:
  """Returns a 1-D mesh with axis 'data' over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that keeps a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that splits the leading (batch) axis over the 'data' axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """Returns config.learning_rate scaled linearly by batch_size / base_batch_size."""
  return config.learning_rate * config.batch_size / config.base_batch_size


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (SGD as PyTorch's, lr schedule): decay added to the gradient, then momentum.

  `torch.optim.SGD(weight_decay=wd, momentum=m, nesterov=n)` adds `wd * p` to every gradient
  before the momentum buffer; optax's `trace` matches its buffer and Nesterov update.
  """
  schedule = schedules.learning_rate_schedule(
      base_learning_rate(config), steps_per_epoch=steps_per_epoch,
      decay_epochs=config.lr_decay_epochs, decay_factor=config.lr_decay_factor)
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  return tx, schedule


def create_train_state(module: nn.Module, tx: optax.GradientTransformation, *, seed: int,
                       input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
  """Returns a fresh TrainState, initialised under jit directly into replicated arrays."""

  def init():
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = module.init({'params': init_key, 'dropout': init_key},
                            jnp.zeros((1, *input_shape), jnp.float32), train=False)
    variables = flax.core.unfreeze(variables)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), rng=state_key)

  return jax.jit(init, out_shardings=replicated(mesh))()
