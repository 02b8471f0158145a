"""A/B of the train step's XLA:CPU options and of this project's code changes, in one process.

  python benchmarks/xla_cpu_flags.py --config=configs/cifar100_r56_r20.py --rounds=6 \
      --out=benchmarks/xla_cpu_ab_r56_r20.json

Every variant is a train step built and compiled in this one process from the same initial
state, and the variants then take turns step by step, in a rotating order, for `--rounds`
rounds. The figures of merit are the medians over rounds of the reference variant's step
time divided by each variant's in the same round (`--reference`, default 'before': the step
with XLA's default CPU options, no block barriers, the gather resize and the matrix pooling),
for wall time and for this process's CPU time (all threads). First-step losses show whether
a variant computes the same thing.

A variant is (XLA:CPU options of the step, residual-block barriers on/off, code restored
from before, config overrides):
- the options replace `reviewkd_jax.platform.CPU_STEP_OPTIONS` while its step is built;
- without barriers, `models.layers.block_output` is the identity while it is traced;
- 'gather_resize' restores the gather-based nearest resize of the ABFs (its gradient a
  scatter-add), 'matrix_pool' HCL's pooling by averaging matrices at every size; both are
  kept below as they were, to measure what replacing them did.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

EIGEN = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}  # platform.EIGEN_CONVS
KEEP_BARRIERS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}
SHIPPED = dict(KEEP_BARRIERS)
NEW_CODE, OLD_CODE = (), ('gather_resize', 'matrix_pool')

VARIANTS = {  # name: (step options, block barriers, code restored from before, overrides)
    'shipped': (SHIPPED, True, NEW_CODE, {}),
    'before': ({}, False, OLD_CODE, {}),
    'xla_defaults': ({}, False, NEW_CODE, {}),
    'eigen_convs': (EIGEN, False, NEW_CODE, {}),
    'eigen_convs+block_barrier': ({**EIGEN, **KEEP_BARRIERS}, True, NEW_CODE, {}),
    'gather_resize': (SHIPPED, True, ('gather_resize',), {}),
    'matrix_pool': (SHIPPED, True, ('matrix_pool',), {}),
    'onednn_custom_call': ({'xla_cpu_experimental_onednn_custom_call': True}, False, NEW_CODE,
                           {}),
    'legacy_emitters': ({'xla_cpu_use_fusion_emitters': False}, False, NEW_CODE, {}),
    'bfloat16': (SHIPPED, True, NEW_CODE, {'dtype': 'bfloat16'}),
}


def _gather_nearest_resize(x, size):
  """The ABFs' earlier nearest resize: two gathers at PyTorch's source indices."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.models import layers  # pylint: disable=g-import-not-at-top
  h, w = size
  if (x.shape[1], x.shape[2]) == (h, w):
    return x
  x = jnp.take(x, jnp.asarray(layers._torch_nearest_index(x.shape[1], h)), axis=1)  # pylint: disable=protected-access
  return jnp.take(x, jnp.asarray(layers._torch_nearest_index(x.shape[2], w)), axis=2)  # pylint: disable=protected-access


def _matrix_adaptive_avg_pool(x, size):
  """HCL's earlier pooling: averaging matrices at every size, one einsum."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.losses import review  # pylint: disable=g-import-not-at-top
  oh, ow = (size, size) if isinstance(size, int) else size
  ph = jnp.asarray(review.adaptive_pool_matrix(x.shape[1], oh))
  pw = jnp.asarray(review.adaptive_pool_matrix(x.shape[2], ow))
  return jnp.einsum('ih,jw,nhwc->nijc', ph, pw, x, precision=jax.lax.Precision.HIGHEST)


@contextlib.contextmanager
def variant_code(barriers: bool, restored=()):
  """Traces the model with or without block barriers and with the named old code."""
  from reviewkd_jax.distill import reviewkd  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.losses import review  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.models import layers  # pylint: disable=g-import-not-at-top
  saved = (layers.block_output, reviewkd.nearest_resize, review.adaptive_avg_pool)
  if not barriers:
    layers.block_output = lambda x: x
  if 'gather_resize' in restored:
    reviewkd.nearest_resize = _gather_nearest_resize
  if 'matrix_pool' in restored:
    review.adaptive_avg_pool = _matrix_adaptive_avg_pool
  try:
    yield
  finally:
    layers.block_output, reviewkd.nearest_resize, review.adaptive_avg_pool = saved


@contextlib.contextmanager
def step_options(options: dict):
  """Builds steps with `options` in place of the shipped XLA:CPU step options."""
  from reviewkd_jax import platform  # pylint: disable=g-import-not-at-top
  saved = dict(platform.CPU_STEP_OPTIONS)
  platform.CPU_STEP_OPTIONS.clear()
  platform.CPU_STEP_OPTIONS.update(options)
  try:
    yield
  finally:
    platform.CPU_STEP_OPTIONS.clear()
    platform.CPU_STEP_OPTIONS.update(saved)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/cifar100_r56_r20.py')
  parser.add_argument('--variants', default='before,shipped,xla_defaults,gather_resize,'
                      'matrix_pool,eigen_convs,eigen_convs+block_barrier')
  parser.add_argument('--reference', default='before')
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=0)
  parser.add_argument('--dtype', default='')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,unused-import
  import importlib.util  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import hardware, jax_step  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, args.config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.dtype:
    config.dtype = args.dtype
  names = args.variants.split(',')
  compiled, states, first, compile_s = {}, {}, {}, {}
  for name in names:
    options, barrier, restored, overrides = VARIANTS[name]
    variant_config = config.copy_and_resolve_references()
    variant_config.update(overrides)
    # A fresh step per variant: a jitted function caches its trace, so a model patched
    # after the first `lower` would not be traced again.
    with step_options(options):
      step = jax_step.build(variant_config, steps_per_epoch=1000)
    state = step.state
    with variant_code(barrier, restored):
      lowered = step.train_step.lower(state, step.batch, step.teacher_variables)
    t0 = time.perf_counter()
    compiled[name] = lowered.compile()
    compile_s[name] = time.perf_counter() - t0
    states[name], metrics = compiled[name](state, step.batch, step.teacher_variables)
    first[name] = float(metrics['loss'])
    print(f'{name:<22} compiled in {compile_s[name]:5.1f} s, first loss {first[name]:.8f}',
          flush=True)
  times = {n: [] for n in names}
  cpu = {n: [] for n in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      t0, c0 = time.perf_counter(), time.process_time()
      states[name], metrics = compiled[name](states[name], step.batch, step.teacher_variables)
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
    print(f'round {r}: ' + ', '.join(f'{n} {times[n][-1] * 1e3:.0f}' for n in names) +
          f' ms (load {os.getloadavg()[0]:.1f})', flush=True)
  ref = args.reference
  base = np.asarray(times[ref]) if ref in times else None
  base_cpu = np.asarray(cpu[ref]) if ref in cpu else None
  results = {}
  for name in names:
    t = np.asarray(times[name])
    c = np.asarray(cpu[name])
    rel = np.median(base / t) if base is not None else None
    rel_cpu = np.median(base_cpu / c) if base is not None else None
    results[name] = {'step_options': VARIANTS[name][0], 'block_barrier': VARIANTS[name][1],
                     'code_before': list(VARIANTS[name][2]),
                     'config_overrides': VARIANTS[name][3],
                     'compile_s': compile_s[name], 'first_loss': first[name],
                     'median_ms': float(np.median(t) * 1e3), 'times_ms': (t * 1e3).tolist(),
                     'cpu_median_ms': float(np.median(c) * 1e3), 'cpu_ms': (c * 1e3).tolist(),
                     f'speedup_vs_{ref}_paired_median': None if rel is None else float(rel),
                     f'cpu_speedup_vs_{ref}_paired_median':
                         None if rel_cpu is None else float(rel_cpu)}
    print(f"{name:<22} median {np.median(t) * 1e3:8.1f} ms wall, {np.median(c) * 1e3:8.1f} ms "
          f"CPU" + (f"; {rel:.2f}x / {rel_cpu:.2f}x {ref} (median of per-round ratios, "
                    f"wall / CPU)" if rel is not None else ''))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'command': ' '.join(['python', *sys.argv]),
                 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec='seconds'),
                 'machine': hardware.describe(), 'config': args.config,
                 'batch_size': config.batch_size, 'dtype': config.dtype,
                 'reference': ref,
                 'rounds': args.rounds, 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()
