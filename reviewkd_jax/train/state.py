"""The train state, PyTorch-style SGD, the jitted train step's layout and the device mesh:
what the classification and the detection runs share."""
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


def pytorch_sgd(schedule: optax.Schedule, *, weight_decay: float, momentum: float,
                nesterov: bool = False, frozen: Any = None) -> optax.GradientTransformation:
  """Returns SGD as PyTorch's: decay added to the gradient, then momentum, at `schedule`'s lr.

  `torch.optim.SGD(weight_decay=wd, momentum=m, nesterov=n)` adds `wd * p` to every gradient
  before the momentum buffer; optax's `trace` matches its buffer and Nesterov update.
  `frozen`, a tree of bools like the parameters, masks out the parameters marked True (their
  updates are zero and they keep no momentum).
  """
  sgd = optax.chain(optax.add_decayed_weights(weight_decay),
                    optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  if frozen is None:
    return sgd
  labels = jax.tree.map(lambda f: 'frozen' if f else 'train', frozen)
  return optax.multi_transform({'train': sgd, 'frozen': optax.set_to_zero()}, labels)


def jit_train_step(train_step, mesh: Mesh, *, compiler_options: dict | None = None):
  """Returns `train_step(state, batch, teacher_variables) -> (state, metrics)` jitted over
  `mesh`: the batch split on 'data', the state (donated), the teacher's variables and the
  metrics replicated."""
  rep = replicated(mesh)
  return jax.jit(train_step, in_shardings=(rep, batch_sharded(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=(0,),
                 compiler_options=compiler_options)


def create_train_state(module: nn.Module, tx: optax.GradientTransformation, *, seed: int,
                       input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
  """Returns a fresh TrainState, initialised under jit directly into replicated arrays."""

  def init():
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    variables = module.init({'params': init_key, 'dropout': init_key},
                            jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return _state_at_step_0(variables, tx, seed)

  return jax.jit(init, out_shardings=replicated(mesh))()


def train_state_from(variables: Any, tx: optax.GradientTransformation, *, seed: int,
                     mesh: Mesh) -> TrainState:
  """Returns the TrainState `create_train_state` makes, replicated over `mesh`, holding the
  given `variables` ({'params': ..., other collections}, e.g. converted from PyTorch) instead
  of an initialiser's: step 0, a fresh optimizer state, the same `rng` for `seed`. Nothing
  of the module is traced or compiled."""
  return jax.jit(lambda v: _state_at_step_0(v, tx, seed),
                 out_shardings=replicated(mesh))(variables)


def _state_at_step_0(variables: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  _, state_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = dict(flax.core.unfreeze(variables))
  params = variables.pop('params')
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    opt_state=tx.init(params), rng=state_key)
