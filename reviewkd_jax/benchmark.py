"""The former name of the benchmark command, kept for one release: it runs
`python -m reviewkd_jax.bench` with the same flags."""
import runpy
import sys

if __name__ == '__main__':
  print('python -m reviewkd_jax.benchmark is now python -m reviewkd_jax.bench (same flags); '
        'the old name goes in the next release.', file=sys.stderr)
  runpy.run_module('reviewkd_jax.bench', run_name='__main__', alter_sys=True)
