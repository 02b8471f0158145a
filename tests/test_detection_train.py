"""A detector trained end to end by `train_detector` on the offline digit scenes.

A few steps of Faster R-CNN R18-FPN at 128x128 (the mask path's gradients are covered by
tests/test_detection_model.py): losses are finite and logged, COCO AP is computed over every
evaluation scene once, the final model is exported, a run resumed from a mid-run checkpoint
ends bit-identical to the uninterrupted one, and setup mistakes are one message each.
"""
from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from configs import digit_scenes_detector
from reviewkd_jax.train import SetupError
from reviewkd_jax.train.detection import train_detector
from tests.helpers import ONE_DEVICE, snapshot

pytestmark = pytest.mark.slow


def _config(**fields):
  config = digit_scenes_detector.get_config()
  config.mask = False
  config.batch_size = 2
  config.eval_batch_size = 4
  config.eval_subset = 6           # not a multiple of the eval batch: padding is exercised
  config.train_subset = 64
  config.max_steps = 4
  config.lr_steps = (3,)
  config.warmup_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 0
  config.rpn_pre_nms_topk = (200, 100)
  config.rpn_post_nms_topk = (100, 50)
  config.roi_batch_size_per_image = 32
  for k, v in fields.items():
    config[k] = v
  return config


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('detector')
  return workdir, train_detector(_config(), str(workdir), devices=ONE_DEVICE)


def test_trains_evaluates_and_exports(finished):
  workdir, result = finished
  assert result.step == 4
  assert [h['step'] for h in result.history] == [1, 2, 3, 4]
  for h in result.history:
    assert np.isfinite(h['loss'])
    assert {'loss_rpn_cls', 'loss_rpn_loc', 'loss_cls', 'loss_box_reg'} <= set(h)
  # Warm-up then one decay: lr 0.02 * 2/16 * (0.001 -> 1 over 2 steps), x0.1 from step 3
  # (0-based: the lr of the update that step makes).
  lrs = [h['lr'] for h in result.history]
  assert lrs == pytest.approx([0.0025 * 0.001, 0.0025 * 0.5005, 0.0025, 0.00025], rel=1e-5)
  assert result.final['count'] == 6
  assert 0.0 <= result.final['bbox/AP'] <= 1.0
  assert (workdir / 'final').is_dir() and (workdir / 'checkpoints' / '4').is_dir()


def test_resume_from_a_checkpoint_is_exact(finished, tmp_path):
  workdir, result = finished
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '4')
  shutil.rmtree(resumed_dir / 'final')
  resumed = train_detector(_config(), str(resumed_dir), devices=ONE_DEVICE)
  assert resumed.step == 4 and [h['step'] for h in resumed.history] == [3, 4]
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      result.state.params, resumed.state.params)
  assert all(jax.tree.leaves(same))
  assert resumed.final['bbox/AP'] == result.final['bbox/AP']


def test_setup_mistakes_are_one_message_and_write_nothing(finished, tmp_path):
  workdir, _ = finished
  before = snapshot(workdir)
  traced = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: traced.append(event) if event.endswith('trace_duration') else None)
  with pytest.raises(SetupError, match='different run'):
    train_detector(_config(backbone='resnet50'), str(workdir), devices=ONE_DEVICE)
  assert snapshot(workdir) == before
  assert not traced, 'refused only after tracing (and compiling) the detector'
  with pytest.raises(SetupError, match='does not exist'):
    train_detector(_config(weights=str(tmp_path / 'missing.pkl')), str(tmp_path / 'w'),
                   devices=ONE_DEVICE)
  with pytest.raises(SetupError, match=r'tfds build coco/2017|download'):
    train_detector(_config(dataset='coco/2017', data_dir=str(tmp_path / 'empty')),
                   str(tmp_path / 'c'), devices=ONE_DEVICE)
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'c').exists()


@pytest.mark.parametrize('method', ['reviewkd', 'kd', 'fitnet', 'fgfi'])
def test_distillation_methods_train_the_student_from_a_frozen_teacher(finished, tmp_path,
                                                                      method):
  teacher_dir, _ = finished
  # ReviewKD at the 1-vs-8-device test's batch of 8: that test's one-device step is then
  # this one's program, compiled once (the run's compilation cache).
  sizes = (dict(batch_size=8, eval_batch_size=8, eval_subset=8) if method == 'reviewkd'
           else dict(eval_subset=4))
  config = _config(method=method, max_steps=2, checkpoint_every_steps=0, **sizes,
                   backbone='resnet18', teacher_backbone='resnet18',
                   teacher_weights=str(teacher_dir / 'final'), teacher_stride_in_1x1=False,
                   teacher_input_format='RGB', teacher_pixel_mean=(123.675, 116.28, 103.53),
                   teacher_pixel_std=(58.395, 57.12, 57.375))
  config.checkpoint_every_steps = 1
  if method != 'reviewkd':
    config.stop_after_step = 1  # one step, no final evaluation (the reviewkd run has both)
  result = train_detector(config, str(tmp_path / 'run'), devices=ONE_DEVICE)
  term = f'loss_{method}'
  assert all(np.isfinite(h[term]) and h[term] > 0 for h in result.history)
  assert np.isclose(result.history[0]['loss'], sum(v for k, v in result.history[0].items()
                                                   if k.startswith('loss_')), rtol=1e-5)
  distill = jax.tree.leaves(result.state.params['distill'])
  assert (len(distill) > 0) == (method != 'kd')   # KD has no trainable module
  assert (result.final is not None) == (method == 'reviewkd')
  if method == 'reviewkd':
    # Resumed from step 1: the student, the ABFs and their BN statistics end bit-identical
    # (the teacher is not in the state: it is reloaded from its weights).
    shutil.copytree(tmp_path / 'run', tmp_path / 'resumed')
    shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '2')
    shutil.rmtree(tmp_path / 'resumed' / 'final')
    resumed = train_detector(config, str(tmp_path / 'resumed'), devices=ONE_DEVICE)
    assert [h['step'] for h in resumed.history] == [2]
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        (result.state.params, result.state.model_state),
                        (resumed.state.params, resumed.state.model_state))
    assert all(jax.tree.leaves(same))


def test_a_distillation_step_agrees_over_1_and_8_devices(finished, tmp_path):
  teacher_dir, _ = finished
  config = _config(method='reviewkd', max_steps=1, checkpoint_every_steps=0, eval_subset=8,
                   batch_size=8, eval_batch_size=8, teacher_backbone='resnet18',
                   teacher_weights=str(teacher_dir / 'final'), teacher_stride_in_1x1=False,
                   teacher_input_format='RGB', teacher_pixel_mean=(123.675, 116.28, 103.53),
                   teacher_pixel_std=(58.395, 57.12, 57.375))
  config.stop_after_step = 1  # the step only: no final evaluation on either mesh
  one = train_detector(config, str(tmp_path / 'one'), devices=jax.devices()[:1])
  eight = train_detector(config, str(tmp_path / 'eight'), devices=jax.devices()[:8])
  for key in ('loss', 'loss_reviewkd', 'loss_cls', 'loss_rpn_cls'):
    assert one.history[0][key] == pytest.approx(eight.history[0][key], rel=1e-4), key
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                      one.state.params, eight.state.params)
  assert max(jax.tree.leaves(diff)) < 1e-4
