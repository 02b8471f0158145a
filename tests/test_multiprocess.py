"""Multi-process training through main.py, as on a pod: 2 processes x 2 CPU devices on
localhost against 1 process x 4 devices, and both processes killed mid-run then resumed.

The digits dataset (offline, in memory) with a tiny resnet8; every run evaluates, saves
checkpoints and exports best/final models.
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from reviewkd_jax.models import create_model
from reviewkd_jax.train import EXIT_STOPPED
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import teacher as teacher_lib
from tests.helpers import ONE_DEVICE, ROOT, xla_flags

pytestmark = pytest.mark.slow

TOTAL_STEPS = 16  # 2 epochs of 8 global batches of 32 (train_subset 256)
CONFIG = ['--config=configs/default.py', '--config.dataset=digits', '--config.model=resnet8',
          '--config.train_subset=256', '--config.batch_size=32', '--config.base_batch_size=32',
          '--config.eval_batch_size=64', '--config.num_epochs=2', '--config.learning_rate=0.05',
          '--config.log_every_steps=4', '--config.checkpoint_every_steps=2',
          '--config.keep_checkpoints=3', '--config.prefetch_batches=1']
TIMEOUT_S = 300


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, *, processes: int, devices_per_process: int, log_dir) -> list:
  """Starts `processes` copies of main.py (each in its own process group)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3',
         'XLA_FLAGS': xla_flags(devices_per_process)}
  extra = []
  if processes > 1:
    extra = [f'--coordinator_address=127.0.0.1:{_free_port()}',
             f'--num_processes={processes}']
  procs = []
  for i in range(processes):
    log = open(log_dir / f'process{i}.{time.monotonic_ns()}.log', 'w')  # pylint: disable=consider-using-with
    args = [sys.executable, 'main.py', f'--workdir={workdir}', *CONFIG, *extra]
    if processes > 1:
      args.append(f'--process_id={i}')
    procs.append((subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True), log))
  return procs


def _kill(procs) -> None:
  for proc, log in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


def _wait(procs) -> list[str]:
  """Waits for every process (killing all on timeout); returns their logs."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    _kill(procs)
  logs = [open(log.name).read() for _, log in procs]  # pylint: disable=consider-using-with
  for (proc, _), text in zip(procs, logs):
    assert proc.returncode == 0, text[-4000:]
  return logs


def _run(workdir, log_dir, **topology) -> list[str]:
  return _wait(_launch(workdir, log_dir=log_dir, **topology))


def _losses(log: str) -> list[tuple[int, float]]:
  return [(int(m[0]), float(m[1])) for m in re.findall(r'step (\d+)/\d+ .*? \| loss ([\d.]+)',
                                                        log)]


def _final_params(workdir):
  template = teacher_lib.variables_template(create_model('resnet8', num_classes=10),
                                            (32, 32, 3))
  variables, meta = checkpoint_lib.load_model(
      str(workdir / 'final'), template,
      sharding=state_lib.replicated(state_lib.make_mesh(ONE_DEVICE)), expect_model='resnet8')
  assert meta['step'] == TOTAL_STEPS
  return jax.device_get(variables)


@pytest.fixture(scope='module')
def two_by_two(tmp_path_factory):
  """An uninterrupted run of 2 processes x 2 devices: (workdir, logs of both processes)."""
  root = tmp_path_factory.mktemp('2x2')
  return root / 'run', _run(root / 'run', root, processes=2, devices_per_process=2)


def test_processes_agree_and_only_process_0_writes(two_by_two):
  workdir, logs = two_by_two
  losses = [_losses(log) for log in logs]
  # Logged every 4 steps and at every checkpoint (every 2): a save flushes the metrics.
  assert [s for s, _ in losses[0]] == list(range(2, TOTAL_STEPS + 1, 2))
  assert losses[0] == losses[1]
  for log in logs:  # every process evaluates every example once, each epoch
    assert log.count('(450 images)') == 2, log[-3000:]
  events = list(workdir.glob('events.out.tfevents.*'))
  assert len(events) == 1  # process 0's only
  assert {p.name for p in workdir.iterdir()} >= {'checkpoints', 'best', 'final', 'config.json'}
  assert _final_params(workdir)


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.fixture(scope='module')
def one_by_two(tmp_path_factory):
  """An uninterrupted single-process run on 2 devices: (workdir, its log)."""
  root = tmp_path_factory.mktemp('1x2')
  return root / 'run', _run(root / 'run', root, processes=1, devices_per_process=2)


def test_two_processes_equal_one_process_with_four_devices(two_by_two, one_by_two, tmp_path):
  """2 x 2 devices against 1 x 4: the same global batches, so they differ only by float
  reduction order, which a random net amplifies over 16 steps. The yardstick is that same
  amplification between two single-process runs (1 x 4 against 1 x 2 devices)."""
  workdir, logs = two_by_two
  one_by_four = _run(tmp_path / '1x4', tmp_path, processes=1, devices_per_process=4)
  multi, single, other = (np.asarray([l for _, l in _losses(log[0])])
                          for log in (logs, one_by_four, one_by_two[1]))
  assert len(multi) == len(single) == len(other) == TOTAL_STEPS // 2
  # The first two steps start from the same weights: only the data could differ there.
  np.testing.assert_allclose(multi[0], single[0], rtol=1e-5)
  loss_multi, loss_noise = np.max(np.abs(multi - single)), np.max(np.abs(other - single))
  params = {name: _final_params(path) for name, path in
            (('2x2', workdir), ('1x4', tmp_path / '1x4'), ('1x2', one_by_two[0]))}
  param_multi = _max_diff(params['2x2'], params['1x4'])
  param_noise = _max_diff(params['1x2'], params['1x4'])
  print(f'max |loss| difference: 2x2 vs 1x4 {loss_multi:.2e}, 1x2 vs 1x4 {loss_noise:.2e}; '
        f'max |param| difference: 2x2 vs 1x4 {param_multi:.2e}, 1x2 vs 1x4 {param_noise:.2e}')
  assert loss_multi <= 3 * loss_noise + 1e-4
  assert param_multi <= 3 * param_noise + 1e-5


def test_killed_processes_resume_where_an_uninterrupted_run_ends(two_by_two, tmp_path):
  workdir = tmp_path / 'run'
  procs = _launch(workdir, processes=2, devices_per_process=2, log_dir=tmp_path)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    ckpt_dir = workdir / checkpoint_lib.STATE_DIR
    # Kill both as soon as a first checkpoint is committed: mid-run, maybe mid-save.
    while not (ckpt_dir.exists() and any((p / 'commit_success.txt').exists()
                                         for p in ckpt_dir.iterdir() if p.name.isdigit())):
      assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), \
          'the run ended or hung before its first checkpoint'
      time.sleep(0.05)
  finally:
    _kill(procs)
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert steps and steps[-1] < TOTAL_STEPS, f'not killed mid-run: checkpoints {steps}'
  logs = _run(workdir, tmp_path, processes=2, devices_per_process=2)
  assert 'Resumed from' in logs[0]
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir),
               _final_params(two_by_two[0]))


def test_sigterm_saves_mid_epoch_and_the_resumed_run_is_identical(one_by_two, tmp_path):
  workdir = tmp_path / 'run'
  procs = _launch(workdir, processes=1, devices_per_process=2, log_dir=tmp_path)
  (proc, log), = procs
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while f'step 2/{TOTAL_STEPS}' not in open(log.name).read():  # pylint: disable=consider-using-with
      assert time.monotonic() < deadline and proc.poll() is None, open(log.name).read()[-3000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a preempting scheduler sends
    proc.wait(timeout=TIMEOUT_S)
  finally:
    _kill(procs)
  text = open(log.name).read()  # pylint: disable=consider-using-with
  assert proc.returncode == EXIT_STOPPED, text[-3000:]   # stopped before its end, saved
  assert 'SIGTERM received' in text and 'Traceback' not in text
  stopped = int(re.search(r'Stopped for preemption at step (\d+)', text).group(1))
  assert 2 <= stopped < TOTAL_STEPS
  resumed = _run(workdir, tmp_path, processes=1, devices_per_process=2)[0]
  assert f'Resumed from {workdir / checkpoint_lib.STATE_DIR} at step {stopped}' in resumed
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir),
               _final_params(one_by_two[0]))
