"""Deliberate bugs, one at a time, and the tests that must catch them.

Each mutation replaces one line of the package in a copy of the tree and runs the named test
files there; a mutation that no test fails is a gap in the suite. Not collected by pytest
(no `test_` prefix); run it by hand when the suite is reorganised:

  python tests/mutations.py /tmp/mutations.json            # every mutation
  python tests/mutations.py /tmp/mutations.json hcl_bins   # some of them

It prints one line per mutation (exit code, the failing tests) and writes them as JSON.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (file, the line as it is, the bug, the test files that must fail on it)
MUTATIONS = {
    'hcl_bins': ('reviewkd_jax/losses/review.py', 'HCL_LEVELS = (4, 2, 1)',
                 'HCL_LEVELS = (4, 2)', ['tests/test_losses.py']),
    'abf_attention': ('reviewkd_jax/distill/reviewkd.py',
                      'x = x * z[..., 0:1] + y * z[..., 1:2]',
                      'x = x * z[..., 1:2] + y * z[..., 0:1]', ['tests/test_reviewkd.py']),
    'bn_statistic': ('reviewkd_jax/models/layers.py', 'unbiased = var * (n / max(n - 1, 1))',
                     'unbiased = var', ['tests/test_models_cifar_resnet_wrn_vgg.py',
                                        'tests/test_reviewkd.py',
                                        'tests/test_models_imagenet.py']),
    'box_coder_clamp': ('reviewkd_jax/detection/boxes.py', 'SCALE_CLAMP = math.log(1000.0 / 16)',
                        'SCALE_CLAMP = math.log(1000.0 / 64)',
                        ['tests/test_detection_rpn.py', 'tests/test_detection_roi_heads.py']),
    'kd_temperature': ('reviewkd_jax/losses/logits.py', 'temperature: float = 4.0',
                       'temperature: float = 3.0',
                       ['tests/test_losses.py', 'tests/test_methods_losses.py']),
    'resume_step': ('reviewkd_jax/train/trainer.py', '  step = int(state.step)\n',
                    '  step = int(state.step) + (1 if int(state.step) else 0)\n',
                    ['tests/test_train.py']),
    'detection_resume_step': ('reviewkd_jax/train/detection.py', '  step = int(state.step)\n',
                              '  step = int(state.step) + (1 if int(state.step) else 0)\n',
                              ['tests/test_detection_train.py']),
    'process_share': ('reviewkd_jax/data/shares.py',
                      'return slice(start, start + base + (process_index < extra))',
                      'return slice(start, start + base + (process_index <= extra))',
                      ['tests/test_data.py']),
    'pad_before_normalising': ('reviewkd_jax/detection/model.py',
                               '      x = jnp.where((rows & cols)[..., None], x, 0.0)',
                               '      pass', ['tests/test_detection_padding.py']),
    'mask_target_clamp': ('reviewkd_jax/detection/roi_heads.py',
                          'chunk=chunk, map_sizes=map_sizes)', 'chunk=chunk, map_sizes=None)',
                          ['tests/test_detection_padding.py']),
}


def run(name: str, workroot: str) -> dict:
  path, old, new, tests = MUTATIONS[name]
  work = os.path.join(workroot, name)
  shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns('.git', '.venv', '__pycache__'))
  target = pathlib.Path(work, path)
  text = target.read_text()
  if text.count(old) != 1:
    raise SystemExit(f'{name}: {path} holds {text.count(old)} copies of {old!r}, not 1: '
                     'update MUTATIONS to the code')
  target.write_text(text.replace(old, new))
  start = time.time()
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-n', '0', *tests],
                        cwd=work, capture_output=True, text=True, check=False)
  shutil.rmtree(work, ignore_errors=True)
  failed = [line.split(' ')[1] for line in proc.stdout.splitlines()
            if line.startswith('FAILED')]
  return {'file': path, 'tests_run': tests, 'exit': proc.returncode, 'failed': failed,
          'seconds': round(time.time() - start, 1), 'tail': proc.stdout.splitlines()[-1:]}


def main(argv):
  out, names = argv[1], argv[2:] or list(MUTATIONS)
  results = {}
  with tempfile.TemporaryDirectory(prefix='reviewkd_mutations_') as workroot:
    for name in names:
      results[name] = run(name, workroot)
      r = results[name]
      print(f"{name}: exit {r['exit']}, {r['seconds']} s, failed {r['failed']} {r['tail']}",
            flush=True)
  pathlib.Path(out).write_text(json.dumps(results, indent=1))
  caught = sum(bool(r['failed']) for r in results.values())
  print(f'{caught} of {len(results)} mutations caught')


if __name__ == '__main__':
  main(sys.argv)
