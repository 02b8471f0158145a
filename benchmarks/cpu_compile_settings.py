"""Compile time of two programs the tests build under three XLA:CPU settings, in alternating
rounds: its fusion emitters (its default) at LLVM optimisation level 1, its older loop-fusion
code generator at level 1, and the older generator at level 0 (what tests/conftest.py picks).

The programs: the ReviewKD classification train step of the tests' tiny config (resnet8
student, resnet20 teacher, batch 16) and the Faster R-CNN R18-FPN train step of
tests/test_detection_train.py (128x128, batch 2), on one CPU device.

  python benchmarks/cpu_compile_settings.py [--rounds=3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compile_once(options: dict) -> dict[str, float]:
  """In this process: compiles each program once with the given options, returns seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  from reviewkd_jax import platform  # pylint: disable=g-import-not-at-top
  from reviewkd_jax import preflight  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from tests import test_detection_train  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  platform.skip_absent_tpu()
  mesh = state_lib.make_mesh(jax.devices()[:1])
  programs = {
      'classification step (tiny)': (preflight.classification_step, tiny_config(
          method='reviewkd', model='resnet8', teacher='resnet20', batch_size=16)),
      'detection step (test_detection_train)': (preflight.detection_step,
                                                test_detection_train._config()),  # pylint: disable=protected-access
  }
  out = {}
  for name, (build, config) in programs.items():
    step, args = build(config, mesh)
    lowered = step.trace(*args).lower()
    start = time.perf_counter()
    lowered.compile(options)
    out[name] = time.perf_counter() - start
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--one', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one is not None:
    print(json.dumps(_compile_once(json.loads(args.one))))
    return
  # A fresh process per compile: nothing is reused from an earlier compile.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  generators = {
      'fusion emitters, level 1': {'xla_backend_optimization_level': 1,
                                   'xla_cpu_use_fusion_emitters': True},
      'older generator, level 1': {'xla_backend_optimization_level': 1,
                                   'xla_cpu_use_fusion_emitters': False},
      'older generator, level 0 (tests)': {'xla_backend_optimization_level': 0,
                                           'xla_cpu_use_fusion_emitters': False}}
  times = {}
  for r in range(args.rounds):
    order = list(generators.items()) if r % 2 == 0 else list(reversed(generators.items()))
    for gen, options in order:
      proc = subprocess.run([sys.executable, __file__, f'--one={json.dumps(options)}'], env=env,
                            check=True, capture_output=True, text=True)
      for name, seconds in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        times.setdefault(name, {}).setdefault(gen, []).append(seconds)
  print(f'1-minute load average at the end: {os.getloadavg()[0]:.2f}; {args.rounds} rounds '
        'alternating the settings, median compile seconds')
  print('| program | ' + ' | '.join(generators) + ' |')
  print('|---|' + '---|' * len(generators))
  for name, by_gen in times.items():
    print(f'| {name} | ' + ' | '.join(f'{statistics.median(by_gen[g]):.2f} s'
                                      for g in generators) + ' |')


if __name__ == '__main__':
  main()
