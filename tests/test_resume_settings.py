"""A resume compares every config field that changes what is trained with the checkpoint's,
and refuses a difference in one sentence naming the field, both values and the override that
resumes; the fields that may change (logging, evaluation, checkpoint cadence, where to stop,
where the files are) resume."""
import pytest

from configs import default
from configs import digit_scenes_detector
from reviewkd_jax.train import SetupError
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import detection
from reviewkd_jax.train import trainer
from tests.helpers import ONE_DEVICE, snapshot

TASKS = {
    'classification': (default.get_config, trainer.RESUMABLE_FIELDS),
    'detection': (lambda: detection.resolve_input_conventions(
        digit_scenes_detector.get_config()), detection.RESUMABLE_FIELDS),
}


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + 'x'
  if isinstance(value, tuple):
    return value + (value[-1],) if value else (1,)
  raise AssertionError(f'no change for {value!r}')


@pytest.mark.parametrize('task', list(TASKS))
def test_every_field_but_the_resumable_ones_is_compared(task):
  get_config, resumable = TASKS[task]
  config = get_config()
  stored = {trainer.SETTINGS: trainer.trained_settings(config, resumable)}
  assert not set(resumable) - set(config.keys()), 'a resumable field the config lacks'
  for field, value in config.items():
    other = get_config()
    if value is None:  # an unset typed field (a teacher's input convention without a teacher)
      for candidate in (True, 'BGR', (1.0, 2.0, 3.0)):
        try:
          other[field] = candidate
          break
        except TypeError:
          pass
    else:
      other[field] = _changed(value)
    settings = trainer.trained_settings(other, resumable)
    if field in resumable:
      assert trainer.check_same_settings(stored, settings, '/w', resumable)
      continue
    with pytest.raises(checkpoint_lib.OtherRunError) as e:
      trainer.check_same_settings(stored, settings, '/w', resumable)
    message = str(e.value)
    assert f'({field}: {value!r} in the checkpoint, {other[field]!r} in the config)' in message
    assert len(message.splitlines()) == 1


def test_checkpoint_without_settings_is_left_to_the_caller():
  config = default.get_config()
  settings = trainer.trained_settings(config, trainer.RESUMABLE_FIELDS)
  assert not trainer.check_same_settings({'model': 'resnet20'}, settings, '/w',
                                         trainer.RESUMABLE_FIELDS)


def _detector_config(**fields):
  config = digit_scenes_detector.get_config()
  config.update(batch_size=2, eval_batch_size=4, train_subset=8, eval_subset=4, max_steps=4,
                fpn_channels=32, box_head_dim=64, mask_head_dim=32,
                rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50),
                roi_batch_size_per_image=32)
  config.update(fields)
  return config


def test_detection_resume_with_other_head_widths_is_refused_before_reading(tmp_path):
  workdir = tmp_path / 'run'
  saved = detection.resolve_input_conventions(_detector_config())
  ckpts = checkpoint_lib.RunCheckpoints(str(workdir), keep=1)
  ckpts.save(2, {'w': 0}, {trainer.SETTINGS: trainer.trained_settings(
      saved, detection.RESUMABLE_FIELDS), 'step': 2})
  ckpts.close()
  before = snapshot(workdir)
  with pytest.raises(SetupError) as e:
    detection.train_detector(_detector_config(fpn_channels=16, log_every_steps=7),
                             str(workdir), devices=ONE_DEVICE)
  message = str(e.value)
  assert ('holds the checkpoints of a different run (fpn_channels: 32 in the checkpoint, 16 in '
          'the config)') in message
  assert '--config.fpn_channels=32' in message and 'max_steps' in message
  assert len(message.splitlines()) == 1 and 'log_every_steps:' not in message
  assert snapshot(workdir) == before
