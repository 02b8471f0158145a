"""What an installed libtpu costs a CPU-only process: `import jax` and the first computation.

  python benchmarks/libtpu_cpu_cost.py [--rounds=7] [--python_without_libtpu=PATH]

Fresh processes, the modes interleaved round by round (so load changes hit all alike):
- `probe`: JAX as it starts by itself with libtpu installed (it tries its TPU backend);
- `skip`: the same after `reviewkd_jax.platform.skip_absent_tpu()` (what main.py, the
  benchmark and the pre-flight call first);
- `no_libtpu`: another interpreter whose environment has no libtpu, if given.
Prints each mode's median import and first-computation seconds, the lines the process wrote
to stderr, and the load average before and after.
"""
import argparse
import os
import statistics
import subprocess
import sys

CODE = '''
import time
t0 = time.perf_counter()
{pre}
import jax
t1 = time.perf_counter()
jax.numpy.ones(1).block_until_ready()
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, jax.devices()[0].platform)
'''
PRE = {'probe': '', 'skip': 'from reviewkd_jax import platform; platform.skip_absent_tpu()',
       'no_libtpu': ''}


def once(python: str, mode: str) -> tuple[float, float, str, int]:
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  proc = subprocess.run([python, '-c', CODE.format(pre=PRE[mode])], capture_output=True,
                        text=True, env=env, check=True)
  imp, first, plat = proc.stdout.split()
  return float(imp), float(first), plat, len(proc.stderr.splitlines())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--python_without_libtpu', default=None)
  args = parser.parse_args()
  modes = {'probe': sys.executable, 'skip': sys.executable}
  if args.python_without_libtpu:
    modes['no_libtpu'] = args.python_without_libtpu
  load_before = os.getloadavg()
  results = {m: [] for m in modes}
  for _ in range(args.rounds):
    for mode, python in modes.items():
      results[mode].append(once(python, mode))
  load_after = os.getloadavg()
  print(f'{os.cpu_count()} cores; load average before {load_before[0]:.1f}, after '
        f'{load_after[0]:.1f}; {args.rounds} rounds')
  for mode, rows in results.items():
    print(f'{mode:10s} import jax {statistics.median(r[0] for r in rows):.2f} s, first '
          f'computation {statistics.median(r[1] for r in rows):.3f} s, platform {rows[0][2]}, '
          f'stderr lines {max(r[3] for r in rows)}')


if __name__ == '__main__':
  main()
