"""Every setup mistake, as a user makes it through main.py: exit code 1, one clear message,
no traceback, and nothing in the workdir written or lost (offline digits, resnet8); the
mistakes in the config are told before TensorFlow is imported; a NaN
loss is one message too, and a run stopped before its end exits 75 (stopped by SIGTERM:
tests/test_multiprocess.py)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, snapshot, xla_flags

pytestmark = pytest.mark.slow  # subprocesses of main.py

BASE = ['--config=configs/default.py', '--config.dataset=digits', '--config.model=resnet8',
        '--config.batch_size=32', '--config.eval_batch_size=64', '--config.num_epochs=1']
TWO_DEVICES = {'XLA_FLAGS': xla_flags(2)}


def _main(workdir: pathlib.Path, *args: str, env: dict | None = None):
  # -X importtime: Python lists every module it imports on stderr (`_imported`).
  return subprocess.run(
      [sys.executable, '-X', 'importtime', 'main.py', f'--workdir={workdir}', *BASE, *args],
      cwd=ROOT,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu', **(env or {})},
      capture_output=True, text=True, timeout=300, check=False)


def _imported(proc) -> set[str]:
  return {line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines()
          if line.startswith('import time:')}


def _assert_refused(proc, *texts):
  assert proc.returncode == 1, proc.stderr[-3000:]
  messages = '\n'.join(line for line in proc.stderr.splitlines()
                       if not line.startswith('import time:'))
  for text in texts:
    assert text in messages, (text, messages[-3000:])
  assert 'Traceback' not in messages, messages[-3000:]


@pytest.fixture(scope='module')
def resnet8_pth(tmp_path_factory):
  """A PyTorch state_dict of a CIFAR resnet8 (the wrong network for a resnet20 teacher)."""
  torch = pytest.importorskip('torch')
  from reviewkd_jax import testing  # pylint: disable=g-import-not-at-top
  model, _ = testing.build('resnet8', num_classes=10)
  path = tmp_path_factory.mktemp('teacher') / 'resnet8.pth'
  torch.save(model.state_dict(), path)
  return path


# (what the user typed, what the message must say)
MISTAKES = {
    'batch_not_divisible': ((['--config.batch_size=25'], TWO_DEVICES),
                            ['config.batch_size=25 must be divisible by the number of devices '
                             '(2)']),
    'unknown_model': ((['--config.model=Resnet8'], None),
                      ["Unknown model 'Resnet8'", "Did you mean 'resnet8'?"]),
    'unknown_method': ((['--config.method=reviewdk'], None),
                       ["Unknown method 'reviewdk'", 'Known methods: at, crd']),
    'unknown_dataset': ((['--config.dataset=cifar10'], None),
                        ["Unknown dataset 'cifar10'", 'known datasets: cifar100']),
    'bad_teacher_bn_mode': ((['--config.method=reviewkd', '--config.teacher=resnet20',
                              '--config.teacher_weights=x.pth',
                              '--config.teacher_bn_mode=train'], None),
                            ["config.teacher_bn_mode must be one of ('eval', 'batch_stats'), "
                             "got 'train'"]),
    'bad_dtype': ((['--config.dtype=float16'], None),
                  ["config.dtype must be one of ('float32', 'bfloat16'), got 'float16'"]),
    'batch_size_zero': ((['--config.batch_size=0'], None),
                        ['config.batch_size must be >= 1, got 0.']),
    'train_subset_below_one_batch': ((['--config.train_subset=5'], None),
                                     ['config.train_subset=5 is smaller than one batch']),
    'missing_teacher_weights': ((['--config.method=reviewkd', '--config.teacher=resnet20',
                                     '--config.teacher_weights=/nonexistent/teacher'], None),
                                   ['No checkpoint at /nonexistent/teacher']),
}


@pytest.mark.parametrize('kind', list(MISTAKES))
def test_setup_mistake_is_one_message_and_writes_nothing(kind, tmp_path):
  (args, env), texts = MISTAKES[kind]
  workdir = tmp_path / 'run'
  proc = _main(workdir, *args, env=env)
  _assert_refused(proc, *texts)
  assert not workdir.exists()
  # Told before TensorFlow (seconds to import) is needed.
  imported = _imported(proc)
  assert 'jax' in imported and 'reviewkd_jax.train' in imported
  assert not imported & {'tensorflow', 'tensorflow_datasets', 'clu.metric_writers'}


def test_teacher_weights_of_another_network(tmp_path, resnet8_pth):
  workdir = tmp_path / 'run'
  proc = _main(workdir, '--config.method=reviewkd', '--config.teacher=resnet20',
               f'--config.teacher_weights={resnet8_pth}')
  _assert_refused(proc, "Teacher 'resnet20' cannot be loaded from", 'Missing')
  assert not workdir.exists()


def test_workdir_of_another_experiment_is_left_as_it_was(tmp_path):
  from reviewkd_jax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  ckpts = checkpoint_lib.RunCheckpoints(str(workdir), keep=1)
  ckpts.save(7, {'w': np.zeros(3, np.float32)},
             {'dataset': 'digits', 'train_subset': 0, 'model': 'resnet20', 'method': 'none',
              'teacher': '', 'batch_size': 32, 'steps_per_epoch': 42, 'seed': 0})
  ckpts.close()
  before = snapshot(workdir)
  _assert_refused(_main(workdir), 'holds the checkpoints of a different run',
                  "model: 'resnet20' in the checkpoint, 'resnet8' in the config")
  assert snapshot(workdir) == before


def test_config_file_typo_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/defualt.py', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
      timeout=300, check=False)
  _assert_refused(proc, 'The config file configs/defualt.py does not exist. Did you mean '
                  'configs/default.py?')
  assert 'OSError' not in proc.stderr


def test_unreadable_teacher_file_is_one_line_naming_it(tmp_path):
  bad = tmp_path / 'teacher.pth'
  bad.write_bytes(np.random.default_rng(0).bytes(4096))
  proc = _main(tmp_path / 'run', '--config.method=reviewkd', '--config.teacher=resnet20',
               f'--config.teacher_weights={bad}')
  _assert_refused(proc, f'{bad} (4096 bytes) is not a readable PyTorch weights (.pt/.pth) file')
  assert not (tmp_path / 'run').exists()


def test_workdir_that_cannot_be_written_is_one_message(tmp_path):
  (tmp_path / 'a_file').write_text('')
  _assert_refused(_main(tmp_path / 'a_file' / 'run'), f'The workdir {tmp_path / "a_file" / "run"} '
                  'cannot be written', 'give a --workdir you can write to')


def test_stopped_run_exits_with_its_own_code_and_a_nan_loss_with_one_message(tmp_path):
  stopped = _main(tmp_path / 'stopped', '--config.stop_after_step=1')
  assert stopped.returncode == 75, stopped.stderr[-3000:]
  assert 'Stopped at step 1 of' in stopped.stderr and 'Traceback' not in stopped.stderr
  nan = _main(tmp_path / 'nan', '--config.learning_rate=1e30', '--config.log_every_steps=1',
              '--config.checkpoint_every_steps=1')
  _assert_refused(nan, 'Non-finite loss at step', 'The last good checkpoint (step ')
