"""Which run a config asks for (`config.task`, read by `train.tasks.task_of` only), fields
read under their former names for one release, and main.py's own checks of the config file
and its overrides (no library error text is parsed)."""
import importlib

import ml_collections
import pytest

import main
from configs import default
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import run_core, tasks, trainer
from tests.helpers import ROOT

# The arguments of the config files that need one (each file's own message names them).
ARGUMENTS = {'cifar100_ablation_components': 'row=rm', 'cifar100_baseline': 'model=resnet56',
             'cifar100_ablation_stages': 'student_stage=1,teacher_stage=1',
             'cifar100_table1': 'pair=r56_r20,method=kd',
             'coco_detector': 'model=faster_rcnn_r18_fpn',
             'coco_distill': 'pair=faster_r18_r101,method=reviewkd',
             'imagenet_baseline': 'model=resnet18'}


def _config_files():
  for path in sorted((ROOT / 'configs').glob('*.py')):
    module = importlib.import_module(f'configs.{path.stem}')
    if hasattr(module, 'get_config'):
      args = [ARGUMENTS[path.stem]] if path.stem in ARGUMENTS else []
      yield path.stem, module.get_config(*args)


def test_every_config_file_names_its_task():
  seen = set()
  for name, config in _config_files():
    assert 'task' in config, name
    seen.add(tasks.task_of(config))
    if config.task == tasks.SUITE:
      assert {tasks.get_task(run).name for run in config.runs.values()} <= set(tasks.TASKS)
  assert seen == set(tasks.NAMES)


def test_a_config_without_task_is_read_as_before_with_a_warning(monkeypatch):
  warned = []
  monkeypatch.setattr(tasks.logging, 'warning', lambda *a: warned.append(a[0] % a[1:]))
  assert tasks.task_of(ml_collections.ConfigDict({'model': 'resnet8'})) == tasks.CLASSIFICATION
  assert tasks.task_of(ml_collections.ConfigDict({'runs': {}})) == tasks.SUITE
  assert len(warned) == 2 and all('config.task' in w and '\n' not in w for w in warned)
  with pytest.raises(ValueError, match="config.task='detect' is not a task"):
    tasks.task_of(ml_collections.ConfigDict({'task': 'detect'}))


def test_former_field_name_is_read_under_the_new_one_with_one_warning(monkeypatch):
  warned = []
  monkeypatch.setattr(run_core.logging, 'warning', lambda *a: warned.append(a[0] % a[1:]))
  config = default.get_config()
  config.teacher_checkpoint = '/t'
  read = run_core.read_renamed_fields(config, trainer.RENAMED_FIELDS)
  assert (read.teacher_weights, read.teacher_checkpoint) == ('/t', '')
  assert config.teacher_checkpoint == '/t' and config.teacher_weights == ''  # not changed
  assert len(warned) == 1 and 'config.teacher_checkpoint is deprecated' in warned[0]
  assert run_core.read_renamed_fields(read, trainer.RENAMED_FIELDS) is read  # nothing to do
  config.teacher_weights = '/other'
  with pytest.raises(ValueError, match='set config.teacher_weights only'):
    run_core.read_renamed_fields(config, trainer.RENAMED_FIELDS)


def test_checkpoint_saved_under_the_former_name_is_compared_under_the_new_one():
  old = default.get_config()
  old.teacher_checkpoint = '/t'
  stored = run_core.trained_settings(old, trainer.RESUMABLE_FIELDS)
  del stored['teacher_weights']  # saved before the rename
  meta = {run_core.SETTINGS: stored}
  new = run_core.read_renamed_fields(old, trainer.RENAMED_FIELDS)
  settings = run_core.trained_settings(new, trainer.RESUMABLE_FIELDS)
  assert run_core.check_same_settings(meta, settings, '/w', trainer.RESUMABLE_FIELDS,
                                      trainer.RENAMED_FIELDS)
  new.teacher_weights = '/u'
  settings = run_core.trained_settings(new, trainer.RESUMABLE_FIELDS)
  with pytest.raises(checkpoint_lib.OtherRunError, match="teacher_weights: '/t' in the checkp"):
    run_core.check_same_settings(meta, settings, '/w', trainer.RESUMABLE_FIELDS,
                                 trainer.RENAMED_FIELDS)


@pytest.mark.parametrize('argv, says', [
    (['--config=configs/default.py', '--config.learnig_rate=1'],
     "Unknown config field 'learnig_rate' (--config.learnig_rate). Did you mean "
     "'learning_rate'?"),
    (['--config', 'configs/default.py', '--config.runs.a=1'], "Unknown config field 'runs.a'"),
    (['--config=configs/defualt.py'], 'The config file configs/defualt.py does not exist. '
     'Did you mean configs/default.py?'),
    (['--config=configs/cifar100_baseline.py:resnet56'], 'did you mean model=resnet56?'),
    (['--config=configs/pairs.py'], 'defines no get_config()'),
])
def test_config_file_and_overrides_are_checked_before_the_flags_are_parsed(argv, says):
  with pytest.raises(SystemExit) as e:
    config = main._load_config(['main.py', *argv])  # pylint: disable=protected-access
    main._check_overrides(config, ['main.py', *argv])  # pylint: disable=protected-access
  assert says in str(e.value) and '\n' not in str(e.value).strip()


def test_overrides_of_real_fields_and_former_names_pass():
  argv = ['main.py', '--config=configs/default.py', '--config.teacher_checkpoint=/t',
          '--config.lr_decay_epochs=(1,)', '--noconfig.eval_teacher']
  main._check_overrides(main._load_config(argv), argv)  # pylint: disable=protected-access
  assert main._load_config(['main.py']) is None  # pylint: disable=protected-access
