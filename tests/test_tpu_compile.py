"""The pre-flight compiles the real train steps for a 2-host TPU slice (v5e:2x4) on this CPU.

A tiny ReviewKD classification step and a tiny ReviewKD Faster R-CNN step, the batch split
over all 8 chips, through libtpu's compiler (requirements-dev.txt installs it; no TPU is
used): the report carries the compiler's memory, FLOPs and collectives, and they agree with
what the program must hold and do. The largest-batch search, the HLO reading and the
messages for a missing libtpu or a wrong topology are checked without compiling. The two
compiles take minutes on a 2-core machine (the TPU compiler's own time), hence `slow`; CI
runs them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo_digit_scenes
from reviewkd_jax import preflight
from tests.helpers import ROOT, tiny_config

TOPOLOGY = 'v5e:2x4'


def _program_flops(build, config) -> float:
  """Returns the FLOPs of the whole step as traced (XLA's analysis before partitioning),
  lowered for this machine's CPU devices."""
  from reviewkd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  step, args = build(config, state_lib.make_mesh(jax.devices()))
  return float(step.trace(*args).lower().cost_analysis()['flops'])


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def classification():
  config = tiny_config(method='reviewkd', model='resnet8', teacher='resnet20', batch_size=16,
                       dtype='bfloat16')
  devices, _ = preflight.topology_devices(TOPOLOGY)
  step, (state, batch, teacher_variables) = preflight.classification_step(
      config, preflight._mesh(devices))  # pylint: disable=protected-access
  del step
  return config, preflight.run(config, TOPOLOGY), state, batch, teacher_variables


@pytest.mark.slow
def test_classification_report_is_the_compilers(classification):
  config, r, state, batch, teacher_variables = classification
  assert (r['chips'], r['hosts'], r['device_kind']) == (8, 2, 'TPU v5 lite')
  assert (r['global_batch'], r['per_chip_batch']) == (16, 2)
  # Every chip holds the replicated state and teacher and its share of the batch (the
  # compiler pads small arrays to its tiles, so a little more).
  held = _bytes(state) + _bytes(teacher_variables) + _bytes(batch) // 8
  assert held <= r['memory']['argument_bytes'] < 3 * held
  # The state is donated: the new state is written into it.
  assert r['memory']['alias_bytes'] >= _bytes(state) - 64
  assert r['fits'] and r['memory']['peak_bytes'] < r['hbm_bytes'] == 16 * 2**30
  # Per chip: an eighth of the program's FLOPs, not all of them. The compiler counts more
  # than the traced program's eighth (its padded tiles and recomputation: 1.4x here, where
  # 16-channel convolutions fill few of the MXU's lanes).
  params = sum(x.size for x in jax.tree.leaves(state.params))
  program = _program_flops(preflight.classification_step, config)
  assert program / 8 <= r['flops_per_chip'] <= 2 * program / 8, (program, r)
  assert r['bytes_accessed_per_chip'] > r['memory']['argument_bytes']
  assert r['flop_bound_step_s'] == pytest.approx(r['flops_per_chip'] / 197e12)
  assert r['flop_bound_images_per_s'] == pytest.approx(16 / r['flop_bound_step_s'])
  # Data parallelism: the gradients (at least 2 bytes a parameter) are all-reduced; nothing
  # else moves between chips.
  assert set(r['collectives']) == {'all-reduce'}
  assert r['collectives']['all-reduce']['bytes'] >= 2 * params
  assert r['compile_s'] > 0
  text = preflight.format_report(r, config_name='tiny', topology=TOPOLOGY)
  assert '8 chips (TPU v5 lite) on 2 hosts' in text and 'fits' in text
  assert 'all-reduce x' in text and 'not measurements on hardware' in text
  assert 'https://cloud.google.com/tpu/docs/v5e' in text


@pytest.mark.slow
def test_detection_distillation_step_compiles_for_two_hosts():
  # 64x64 canvases: libtpu compiles the step in about 60% of the time it takes at the demo's
  # 96x96, and the pyramid still has every level (P6 1x1).
  config = demo_digit_scenes.scenes_run(
      method='reviewkd', reviewkd_weight=1.0, teacher_backbone='resnet18', mask=False,
      rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50), roi_batch_size_per_image=32,
      fpn_channels=32, box_head_dim=64, batch_size=8, train_min_sizes=(64,), train_max_size=64,
      test_min_size=64, test_max_size=64, pad_size=(64, 64))
  r = preflight.run(config, TOPOLOGY)
  assert (r['chips'], r['hosts'], r['per_chip_batch']) == (8, 2, 1)
  assert r['fits'] and 0 < r['memory']['temp_bytes'] < r['hbm_bytes']
  program = _program_flops(preflight.detection_step, config)
  assert 0.9 * program / 8 <= r['flops_per_chip'] < program / 2, (program, r)
  # Data parallel: the gradients are all-reduced, and no image's features travel to other
  # chips (RoIAlign pools per image; from one flat buffer of all images' pyramids the
  # partitioner all-gathered 85 MiB per step here).
  assert r['collectives']['all-reduce']['bytes'] > 0
  moved = sum(c['bytes'] for k, c in r['collectives'].items() if k != 'all-reduce')
  assert moved < 2**20, r['collectives']


def test_largest_fitting_batch_bisects_by_compiling(monkeypatch):
  compiled = []

  def fits(config, per_chip, devices, chip):
    del config, devices, chip
    compiled.append(per_chip)
    ok = per_chip <= 37
    return ok, {'memory': {'peak_bytes': per_chip}}, None

  monkeypatch.setattr(preflight, '_fits', fits)
  found = preflight.largest_fitting_batch(None, [], None, start=128)
  assert found['per_chip_batch'] == 37
  assert len(compiled) == len(set(compiled)) < 12     # each batch compiled once
  compiled.clear()
  assert preflight.largest_fitting_batch(None, [], None, start=4)['per_chip_batch'] == 37
  monkeypatch.setattr(preflight, '_fits', lambda *a: (False, None, 'out of memory'))
  assert preflight.largest_fitting_batch(None, [], None, start=8)['per_chip_batch'] == 0


def test_collectives_are_read_from_the_hlo():
  hlo = '\n'.join([
      '  %all-reduce.1 = f32[16,4]{1,0:T(8,128)} all-reduce(%fusion.1), channel_id=1, '
      'metadata={op_name="jit(train_step)/transpose(jvp(Net))/conv" stack_frame_id=3}',
      '  %all-reduce.2 = (bf16[8]{0:T(256)(128)(2,1)}, f32[2]{0}) all-reduce(%a, %b), x=1',
      '  %ag = (f32[4]{0}, f32[32]{0}) all-gather-start(%c), dimensions={0}',
      '  %agd = f32[32]{0} all-gather-done(%ag)',
      '  %f = f32[16,4]{1,0} fusion(%all-reduce.1), kind=kLoop',
  ])
  found = preflight.collectives(hlo)
  assert {k: (v['count'], v['bytes']) for k, v in found.items()} == {
      'all-reduce': (2, 16 * 4 * 4 + 8 * 2 + 2 * 4), 'all-gather': (1, 32 * 4)}
  assert found['all-reduce']['sources'] == {'transpose(jvp(Net))/conv': 256, '?': 24}


def test_without_libtpu_one_message_names_the_install_line(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)   # `import libtpu` raises ImportError
  with pytest.raises(preflight.PreflightError) as e:
    preflight.topology_devices(TOPOLOGY)
  assert f'pip install "jax[tpu]=={jax.__version__}"' in str(e.value)


def test_command_line_refuses_an_unknown_topology_in_one_message():
  proc = subprocess.run(
      [sys.executable, '-m', 'reviewkd_jax.preflight', '--config=configs/cifar100_r56_r20.py',
       '--topology=v9:2x2'], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode == 2
  assert 'v4, v5e, v5p, v6e' in proc.stderr and 'Traceback' not in proc.stderr


def test_cpu_runs_do_not_probe_for_tpus():
  """With libtpu installed and no TPU here, the entry points keep JAX on its CPU backend:
  no libtpu warnings at the first computation. A machine with TPU hardware is left alone."""
  from reviewkd_jax import platform  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  code = ('from reviewkd_jax import platform; print(platform.skip_absent_tpu()); '
          'import jax; jax.numpy.ones(1).block_until_ready(); print(jax.devices()[0].platform)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr
  if platform.tpu_hardware_present() or importlib.util.find_spec('libtpu') is None:
    assert proc.stdout.split()[0] == 'False'
  else:
    assert proc.stdout.split() == ['True', 'cpu']
    assert 'TPU' not in proc.stderr


def test_the_compilers_out_of_memory_refusal_is_recognised():
  # libtpu 0.0.42's words for a step too large for the chip (seen at 131072 images per chip).
  refusal = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                         'required for HLO temporaries (134.90G) exceeds available HBM '
                         '(15.75G).')
  assert preflight._out_of_memory(refusal)  # pylint: disable=protected-access
  assert not preflight._out_of_memory(ValueError('config.batch_size must be >= 1'))  # pylint: disable=protected-access
