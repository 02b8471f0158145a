"""A/B of XLA:CPU compiler options (and one model-side variant) on a config's train step.

  python benchmarks/xla_cpu_flags.py --config=configs/cifar100_r56_r20.py --rounds=8 \
      --out=benchmarks/xla_cpu_flags_r56_r20.json

Every variant is compiled in this one process (`Lowered.compile(compiler_options=...)` takes
XLA debug options per program) from the same initial state, and the variants then take
turns step by step, in a rotating order, for `--rounds` rounds. The figures of merit are
the medians over rounds of the default's step time divided by each variant's in the same
round, for wall time and for this process's CPU time (all threads): on a machine shared
with other jobs the CPU time is the steadier of the two. First-step losses show whether a variant computes the same thing (equal
to the bit with an option that should change the kernels means it changed nothing).

The 'block_barrier' variants trace the model with `jax.lax.optimization_barrier` on every
residual block's output (a monkeypatch of the CIFAR ResNet block here, an experiment) and
keep XLA:CPU from deleting those barriers before fusion (`cse_barrier_expander` disabled):
they test whether stopping the fusion pass from re-computing the residual chain helps.
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

VARIANTS = {  # name: (XLA compiler options, block barriers, config overrides)
    'default': ({}, False, {}),
    'onednn_custom_call': ({'xla_cpu_experimental_onednn_custom_call': True}, False, {}),
    'legacy_emitters': ({'xla_cpu_use_fusion_emitters': False}, False, {}),
    'fast_math': ({'xla_cpu_enable_fast_math': True}, False, {}),
    'vector_width_512': ({'xla_cpu_prefer_vector_width': 512}, False, {}),
    'block_barrier': ({'xla_disable_hlo_passes': 'cse_barrier_expander'}, True, {}),
    'block_barrier+legacy': ({'xla_disable_hlo_passes': 'cse_barrier_expander',
                              'xla_cpu_use_fusion_emitters': False}, True, {}),
    # Convolutions through XLA's Eigen runtime (multi-threaded) instead of YNNPACK fusions,
    # which this jaxlib uses by default; YNNPACK keeps the dots.
    'eigen_convs': ({'xla_cpu_experimental_ynn_fusion_type':
                     'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}, False, {}),
    'eigen_convs+block_barrier': ({'xla_cpu_experimental_ynn_fusion_type':
                                   'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
                                   'xla_disable_hlo_passes': 'cse_barrier_expander'}, True, {}),
    'bfloat16': ({}, False, {'dtype': 'bfloat16'}),
    'bfloat16+block_barrier': ({'xla_disable_hlo_passes': 'cse_barrier_expander'}, True,
                               {'dtype': 'bfloat16'}),
}


@contextlib.contextmanager
def block_barriers(enabled: bool):
  """Puts an optimization barrier on every CIFAR ResNet block output while tracing."""
  if not enabled:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.models import cifar_resnet  # pylint: disable=g-import-not-at-top
  original = cifar_resnet.ResidualBlock.__call__

  def call(self, x, train):
    return jax.lax.optimization_barrier(original(self, x, train))

  cifar_resnet.ResidualBlock.__call__ = call
  try:
    yield
  finally:
    cifar_resnet.ResidualBlock.__call__ = original


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/cifar100_r56_r20.py')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=0)
  parser.add_argument('--dtype', default='')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
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
    options, barrier, overrides = VARIANTS[name]
    variant_config = config.copy_and_resolve_references()
    variant_config.update(overrides)
    # A fresh step per variant: a jitted function caches its trace, so a model patched
    # after the first `lower` would not be traced again.
    step = jax_step.build(variant_config, steps_per_epoch=1000)
    state = step.state
    with block_barriers(barrier):
      lowered = step.train_step.lower(state, step.batch, step.teacher_variables)
    t0 = time.perf_counter()
    compiled[name] = lowered.compile(compiler_options=options or None)
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
  base = np.asarray(times['default']) if 'default' in times else None
  base_cpu = np.asarray(cpu['default']) if 'default' in cpu else None
  results = {}
  for name in names:
    t = np.asarray(times[name])
    c = np.asarray(cpu[name])
    rel = np.median(base / t) if base is not None else None
    rel_cpu = np.median(base_cpu / c) if base is not None else None
    results[name] = {'compiler_options': VARIANTS[name][0], 'block_barrier': VARIANTS[name][1],
                     'config_overrides': VARIANTS[name][2],
                     'compile_s': compile_s[name], 'first_loss': first[name],
                     'median_ms': float(np.median(t) * 1e3), 'times_ms': (t * 1e3).tolist(),
                     'cpu_median_ms': float(np.median(c) * 1e3), 'cpu_ms': (c * 1e3).tolist(),
                     'speedup_vs_default_paired_median': None if rel is None else float(rel),
                     'cpu_speedup_vs_default_paired_median':
                         None if rel_cpu is None else float(rel_cpu)}
    print(f"{name:<22} median {np.median(t) * 1e3:8.1f} ms wall, {np.median(c) * 1e3:8.1f} ms "
          f"CPU" + (f"; {rel:.2f}x / {rel_cpu:.2f}x default (median of per-round ratios, "
                    f"wall / CPU)" if rel is not None else ''))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'command': ' '.join(['python', *sys.argv]),
                 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec='seconds'),
                 'machine': hardware.describe(), 'config': args.config,
                 'batch_size': config.batch_size, 'dtype': config.dtype,
                 'rounds': args.rounds, 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()
