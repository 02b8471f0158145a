"""The real train step of a config, on synthetic on-device batches: compile, time, memory, FLOPs.

Everything is built by the trainer's own `train.setup.build_run` (the method's modules,
PyTorch-style SGD, the train state, the jitted step with its shardings and donation); only
the data (random uint8 images and labels, already on the device) and the teacher's weights
(random) are synthetic, neither of which changes the cost of a step.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reviewkd_jax import data
from reviewkd_jax.bench import hardware
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib


@dataclasses.dataclass
class JaxStep:
  """A ready-to-run train step and its inputs (the state is donated by every call)."""
  config: ml_collections.ConfigDict
  spec: data.DatasetSpec
  mesh: Any
  model: Any
  teacher: Any
  train_step: Any             # the jitted `make_classifier_train_step` function
  state: state_lib.TrainState
  teacher_variables: Any
  batch: dict                 # global arrays, sharded over the batch axis
  host_batch: dict            # the same batch as numpy (for the PyTorch side)
  steps_per_epoch: int


def synthetic_batch(spec: data.DatasetSpec, batch_size: int, seed: int = 0) -> dict:
  """Returns a numpy batch like the pipeline's: uint8 images, int32 labels and indices."""
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (batch_size, *spec.image_shape), dtype=np.uint8),
          'label': rng.integers(0, spec.num_classes, (batch_size,), dtype=np.int32),
          'index': np.arange(batch_size, dtype=np.int32)}


def build(config: ml_collections.ConfigDict, *, steps_per_epoch: int, seed: int = 0,
          devices=None) -> JaxStep:
  """Returns the config's train step, a fresh state, random teacher weights and a batch."""
  mesh = state_lib.make_mesh(devices)
  spec = data.get_spec(config.dataset)
  run = setup_lib.build_run(config, spec, mesh=mesh, steps_per_epoch=steps_per_epoch)
  teacher_variables = None
  if run.teacher is not None:
    teacher_variables = jax.device_put(
        random_variables(run.teacher, spec.image_shape, seed + 1), state_lib.replicated(mesh))
  host_batch = synthetic_batch(spec, config.batch_size, seed)
  batch = jax.device_put(host_batch, state_lib.batch_sharded(mesh))
  return JaxStep(config, spec, mesh, run.model, run.teacher, run.train_step(), run.init_state(),
                 teacher_variables, batch, host_batch, steps_per_epoch)


def random_variables(module, image_shape: tuple[int, ...], seed: int) -> dict:
  """Returns random variables for `module`, drawn on the host (no init program to compile);
  see `draw_variables`."""
  return draw_variables(jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), train=False)), seed)


def draw_variables(template: Any, seed: int) -> dict:
  """Returns host arrays shaped like `template` (a tree of shapes and dtypes): kernels
  ~ N(0, 1/fan_in), BatchNorm scale 1 / bias 0 / mean 0 / var 1, other biases 0, a stand-in
  for trained weights, which cost the same to run."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    fill = 1.0 if name in ('scale', 'var') else 0.0
    return np.full(leaf.shape, fill, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, flax.core.unfreeze(template))


class CompileCounter:
  """Counts XLA backend compilations (JAX's monitoring events) while it is active."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self._active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs):
    del kwargs
    if self._active and event == '/jax/core/compile/backend_compile_duration':
      self.count += 1
      self.seconds += duration

  def __enter__(self):
    self.count, self.seconds, self._active = 0, 0.0, True
    return self

  def __exit__(self, *exc):
    self._active = False


_COUNTER: CompileCounter | None = None


def _counter() -> CompileCounter:
  global _COUNTER
  if _COUNTER is None:  # listeners cannot be removed: register one per process
    _COUNTER = CompileCounter()
  return _COUNTER


def summarize(times_s: list[float]) -> dict:
  """Returns median, mean, min, max, IQR and p10/p90 of `times_s`, in milliseconds.

  With `time.process_time()` deltas (`cpu_step`), these are CPU milliseconds summed over
  the process's threads: on a host shared with other jobs they move less than wall time.
  """
  ms = np.asarray(times_s, np.float64) * 1e3
  q10, q25, q75, q90 = np.percentile(ms, [10, 25, 75, 90])
  return {'median_ms': float(np.median(ms)), 'mean_ms': float(ms.mean()),
          'min_ms': float(ms.min()), 'max_ms': float(ms.max()), 'p10_ms': float(q10),
          'p90_ms': float(q90), 'iqr_ms': float(q75 - q25),
          'stdev_ms': float(statistics.stdev(ms)) if len(ms) > 1 else 0.0, 'n': int(len(ms)),
          'all_ms': [round(float(v), 3) for v in ms]}


def initial_variables(step: JaxStep) -> dict:
  """Returns the trainable module's initial variables on the host (before any donation)."""
  return jax.device_get({'params': step.state.params, **step.state.model_state})


class JaxRunner:
  """Compiles the step once, then runs it in timed rounds (interleavable with PyTorch's).

  `run_synced(n)` times each call on its own, waiting for its outputs (the spread);
  `run_pipelined(n)` makes n calls back to back and waits once (what a training loop sees,
  since it never waits between steps). Every call after the first is watched for XLA
  compilations; the calls cross epoch boundaries (`steps_per_epoch` is small), so a step
  that recompiles when the epoch changes shows up as `recompilations > 0`.
  """

  def __init__(self, step: JaxStep):
    self.step = step
    self.synced: list[float] = []
    self.synced_cpu: list[float] = []  # this process's CPU seconds (all threads) per step
    self.pipelined: list[float] = []   # seconds per step, one entry per pipelined round
    self.recompilations = 0
    self.result: dict = {}

  def compile(self) -> dict:
    """Lowers, compiles and runs the first step; returns times, FLOPs, memory, first loss."""
    s, counter = self.step, _counter()
    args = (s.state, s.batch, s.teacher_variables)
    lowered, compiled, trace_s, compile_s = lower_and_compile(s.train_step, args)
    with counter:
      t0 = time.perf_counter()
      s.state, metrics = s.train_step(*args)  # the jit's own dispatch: no second compile
      first = {k: float(v) for k, v in jax.device_get(metrics).items()}
      first_call_s = time.perf_counter() - t0
    self.result = {'framework': 'jax', 'trace_s': trace_s, 'compile_s': compile_s,
                   'first_call_s': first_call_s,
                   'first_call_compilations': counter.count,
                   'flops_per_step': _flops(lowered), 'memory': _memory(compiled),
                   'first_step_metrics': first}
    return self.result

  def _call(self):
    s = self.step
    s.state, metrics = s.train_step(s.state, s.batch, s.teacher_variables)
    return metrics

  def warmup(self, n: int):
    """Runs n untimed steps."""
    for _ in range(n):
      metrics = self._call()
    jax.block_until_ready((self.step.state, metrics) if n else self.step.state)

  def run_synced(self, n: int):
    """Times n steps one by one."""
    with _counter() as counter:
      for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = self._call()
        jax.block_until_ready((self.step.state, metrics))
        self.synced.append(time.perf_counter() - t0)
        self.synced_cpu.append(time.process_time() - c0)
    self.recompilations += counter.count
    self._last = metrics

  def run_pipelined(self, n: int):
    """Times n steps issued back to back, waiting once at the end."""
    with _counter() as counter:
      t0 = time.perf_counter()
      for _ in range(n):
        metrics = self._call()
      jax.block_until_ready((self.step.state, metrics))
      self.pipelined.append((time.perf_counter() - t0) / n)
    self.recompilations += counter.count
    self._last = metrics

  def summary(self) -> dict:
    """Returns the result dict: compile, step-time stats, throughput, FLOP/s, memory."""
    s = self.step
    stats = summarize(self.synced)
    pipelined_s = float(np.median(self.pipelined)) if self.pipelined else stats['median_ms'] / 1e3
    last = {k: float(v) for k, v in jax.device_get(self._last).items()}
    steps_run = int(s.state.step)
    result = {
        **self.result,
        'step': stats,
        'cpu_step': summarize(self.synced_cpu),
        'pipelined_step_ms': pipelined_s * 1e3,
        'images_per_s': s.config.batch_size / pipelined_s,
        'recompilations': self.recompilations,
        'steps_run': steps_run,
        'epochs_crossed': steps_run // s.steps_per_epoch,
        'last_step_metrics': last,
        'finite': bool(all(np.isfinite(v) for v in last.values())),
        'dtype': s.config.dtype,
        'batch_size': s.config.batch_size,
        'num_devices': s.mesh.size,
    }
    result.update(hardware.utilization(result['flops_per_step'], pipelined_s, s.config.dtype,
                                       s.mesh.size))
    return result


def lower_and_compile(jitted, args: tuple) -> tuple[Any, Any, float, float]:
  """Returns (lowered, compiled, seconds to trace and lower, seconds to compile) of the jitted
  function `jitted` for `args`."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  trace_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return lowered, compiled, trace_s, time.perf_counter() - t0


def _flops(lowered) -> float | None:
  """Returns the FLOPs of one step as written (XLA's cost analysis of the unoptimised HLO).

  Taken before backend optimisation because backends rewrite convolutions into library
  calls (oneDNN, cuDNN) whose FLOPs the optimised module's cost analysis may not count.
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _memory(compiled) -> dict:
  """Returns the compiled step's memory analysis and, where the device has them, its stats."""
  out = {}
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is not None:
    out.update(argument_bytes=int(m.argument_size_in_bytes),
               output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
               generated_code_bytes=int(m.generated_code_size_in_bytes))
    # Live at once: inputs, outputs not aliased to (donated) inputs, and the temporaries.
    out['compiled_peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] -
                                  out['alias_bytes'] + out['temp_bytes'])
  out.update(hardware.device_memory())
  return out
