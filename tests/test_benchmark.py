"""The benchmark runs end to end on a tiny pair and reports sane figures (nothing is timed).

What is checked: the report's structure and JSON form, positive times, no recompilation
across epoch boundaries, FLOPs and compiled memory present, the input pipelines deliver, and
the first step's losses of JAX and PyTorch agree on the same weights and batch.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from reviewkd_jax.bench import input_pipeline
from reviewkd_jax.bench import report as report_lib
from tests.helpers import ROOT

pytest.importorskip('torch')
pytestmark = pytest.mark.slow  # subprocesses of the benchmark command


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  """One run of the command the README gives, on a tiny pair (8 simulated CPU devices)."""
  out = tmp_path_factory.mktemp('benchmark') / 'report.json'
  cmd = [sys.executable, '-m', 'reviewkd_jax.bench', '--config=configs/cifar100_r56_r20.py',
         '--config.model=resnet8', '--config.teacher=resnet14', '--batch_size=8',
         '--config.reviewkd_warmup_epochs=0',  # lambda > 0 from step 0: HCL is in the loss
         '--steps=4', '--rounds=2', '--warmup=1', '--torch=eager',
         '--input_pipeline=cifar100', '--pipeline_batches=2', '--pipeline_batch_size=16',
         '--parts=all', '--parts_per_round=1', '--conv',
         f'--json={out}']
  proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'median ms' in proc.stdout and 'torch_eager' in proc.stdout
  loaded = json.loads(out.read_text())
  loaded['stdout'] = proc.stdout
  return loaded


def test_report_is_json_with_the_documented_fields(report):
  loaded = report
  for key in ('command', 'date', 'machine', 'config', 'settings', 'steps',
              'first_step_agreement', 'input_pipeline', 'targets'):
    assert key in loaded, key
  assert set(loaded['steps']) == {'jax', 'torch_eager'}
  assert loaded['machine']['platform'] == 'cpu'
  assert loaded['machine']['load_average'] is not None
  assert loaded['config']['name'] == 'cifar100_r56_r20.py'
  assert loaded['config']['model'] == 'resnet8' and loaded['config']['batch_size'] == 8
  assert 'reviewkd_jax.bench' in loaded['command']
  # --steps=4 --rounds=2: two interleaved rounds of 2 steps per framework, each with its
  # own JAX-over-PyTorch ratio and load.
  assert len(loaded['rounds']) == 2
  for r in loaded['rounds']:
    assert r['speedup_vs_torch_eager'] == r['torch_eager_ms'] / r['jax_ms'] > 0
    assert r['load_average'] >= 0
  ratios = [r['speedup_vs_torch_eager'] for r in loaded['rounds']]
  assert loaded['speedup']['torch_eager'] == {'median': float(np.median(ratios)),
                                              'min': min(ratios), 'max': max(ratios)}


def test_jax_step_figures_are_sane(report):
  r = report['steps']['jax']
  assert r['compile_s'] > 0 and r['trace_s'] > 0
  assert r['step']['n'] == 4
  assert 0 < r['step']['min_ms'] <= r['step']['median_ms'] <= r['step']['max_ms']
  assert r['pipelined_step_ms'] > 0 and r['images_per_s'] > 0
  assert r['flops_per_step'] > 0 and r['achieved_flops_per_s'] > 0
  assert r['mfu'] is None  # no peak is known for a CPU
  assert r['num_devices'] == jax.device_count()  # the batch is sharded over all devices
  assert r['memory']['compiled_peak_bytes'] > r['memory']['argument_bytes'] > 0
  assert r['finite']
  # 1 + warm-up + 4 synced + 4 back-to-back steps; epochs of 2 steps: boundaries crossed
  # without compiling again (the first call reuses the compiled program too).
  assert r['steps_run'] == 10 and r['epochs_crossed'] >= 4
  assert r['recompilations'] == 0 and r['first_call_compilations'] == 0


def test_torch_step_figures_are_sane(report):
  r = report['steps']['torch_eager']
  assert r['first_call_s'] > 0 and r['step']['n'] == 4 and r['step']['median_ms'] > 0
  assert r['images_per_s'] > 0 and r['finite']


def test_first_step_losses_agree_on_the_same_weights(report):
  agreement = report['first_step_agreement']['torch_eager']
  assert agreement['hcl']['jax'] > 0  # the HCL term is in the compared loss
  assert agreement['agree'], agreement
  assert agreement['max_rel_diff'] <= report_lib.LOSS_RTOL


def test_input_pipeline_and_targets(report):
  (p,) = report['input_pipeline']
  assert p['dataset'] == 'cifar100' and p['local_batch'] == 16
  assert p['images_per_s_per_host'] > 0 and p['images_per_s_per_host_to_device'] > 0
  names = [t['target'] for t in report['targets']]
  assert any('PyTorch eager' in n for n in names)
  assert any('pipeline' in n for n in names)
  assert 'first-step losses' in report['stdout'] and 'target ' in report['stdout']


def test_imagenet_jpeg_pipeline_delivers():
  r = input_pipeline.measure('imagenet', batch_size=8, batches=2, warmup=1, num_jpegs=12,
                             with_device=False)
  assert r['local_batch'] == 8 and r['images_per_s_per_host'] > 0
  assert 50_000 < r['jpeg_mean_bytes'] < 200_000  # near ImageNet's ~110 KB mean


def test_cost_by_part_and_convolutions(report):
  parts = report['parts']['parts']
  assert list(parts) == ['student_step', 'teacher_forward', 'abf_hcl', 'optimizer',
                         'full_step']
  for name, row in parts.items():
    assert row['jax_ms'] > 0 and row['torch_ms'] > 0, name
    assert len(row['torch_over_jax_per_round']) == report['parts']['rounds']
  assert len(report['conv']) == 5
  for row in report['conv']:
    # Both libraries computed the same convolution and gradients.
    assert row['max_rel_diff'] < 1e-5, row
    assert row['fwd_jax_ms'] > 0 and row['fwd_bwd_torch_ms'] > 0
  assert 'PyTorch/JAX' in report['stdout'] and 'conv 3x3' in report['stdout']


def test_former_command_name_runs_the_benchmark_with_a_notice():
  """`python -m reviewkd_jax.benchmark` (the former name) reaches the same command's flags."""
  proc = subprocess.run([sys.executable, '-m', 'reviewkd_jax.benchmark', '--steps=x'], cwd=ROOT,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}, capture_output=True,
                        text=True, timeout=300)
  assert 'is now python -m reviewkd_jax.bench' in proc.stderr
  assert "flag --steps=x: invalid literal for int()" in proc.stderr, proc.stderr[-2000:]
  assert proc.returncode != 0
