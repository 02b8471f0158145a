"""The progress line's speed counts training steps only (a fake clock, no model)."""
import numpy as np
import pytest

from reviewkd_jax.train import progress


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class _Writer:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, scalars))


def _metrics(loss=1.0):
  return {'loss': np.float32(loss), 'top1': np.float32(50.0), 'lr': np.float32(0.1)}


def test_speed_leaves_out_the_first_step_evaluation_and_checkpoints():
  clock, writer = _Clock(), _Writer()
  logger = progress.MetricLogger(writer, total_steps=100, steps_per_epoch=10, global_batch=8,
                                 clock=clock)
  clock.now += 30.0          # the first step compiles
  logger.add(_metrics())
  for _ in range(4):          # then 2 s per step
    clock.now += 2.0
    logger.add(_metrics())
  with logger.paused('eval'):
    clock.now += 50.0
  with logger.paused('checkpoint'):
    clock.now += 7.0
  first = logger.flush(5)
  assert first['steps_per_sec'] == pytest.approx(0.5)       # 4 timed steps in 8 s
  assert first['images_per_sec'] == pytest.approx(4.0)
  assert (first['eval_seconds'], first['checkpoint_seconds']) == (50.0, 7.0)
  for _ in range(5):
    clock.now += 2.0
    logger.add(_metrics())
  second = logger.flush(10)
  assert second['steps_per_sec'] == pytest.approx(0.5)      # steady from line to line
  assert 'eval_seconds' not in second
  # ETA: 90 steps at 2 s, plus 57 s of pauses per 10 steps so far.
  assert second['eta_hours'] * 3600 == pytest.approx(90 * (2.0 + 5.7))
  assert [s for s, _ in writer.scalars] == [5, 10]


def test_non_finite_loss_names_the_step():
  logger = progress.MetricLogger(_Writer(), total_steps=10, steps_per_epoch=5, global_batch=8,
                                 clock=_Clock())
  logger.add(_metrics())
  logger.add(_metrics(float('nan')))
  with pytest.raises(progress.NonFiniteLossError, match='Non-finite loss at step 2 '):
    logger.flush(2)


def test_a_line_after_the_first_step_alone_gives_no_speed_rather_than_zero(caplog):
  # A resumed run logging at its first step: only the compiling step, which is not timed.
  clock, writer = _Clock(), _Writer()
  logger = progress.MetricLogger(writer, total_steps=100, steps_per_epoch=10, global_batch=8,
                                 clock=clock)
  clock.now += 30.0
  logger.add(_metrics())
  with caplog.at_level('INFO'):
    first = logger.flush(51)
  assert np.isnan(first['steps_per_sec']) and np.isnan(first['eta_hours'])
  assert 'steps_per_sec' not in {k.split('/')[1] for k in writer.scalars[0][1]}
  line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith('step 51'))
  assert 'speed from the next line on' in line and 'ETA ?' in line
  for _ in range(4):
    clock.now += 2.0
    logger.add(_metrics())
  assert logger.flush(55)['steps_per_sec'] == pytest.approx(0.5)
