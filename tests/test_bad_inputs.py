"""Bad inputs found at setup, before anything is written: weight files that cannot be read
(one line naming the file and what it is not), counts out of range, a pad size no image
fits in, suites cut down or stopped, and the message of a run stopped by its storage."""
import errno
import os
import pickle
import re

import pytest

from reviewkd_jax import convert
from reviewkd_jax.detection import weights as weights_lib
from reviewkd_jax.train import SetupError, is_stopped, storage_fault, train_and_evaluate
from reviewkd_jax.train import train_suite
from reviewkd_jax.train.detection import train_detector
from configs import digit_scenes_detector
from tests.helpers import ONE_DEVICE, tiny_config


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
  """{name: path} of files that are not weights, as users hand them over."""
  root = tmp_path_factory.mktemp('bad')
  rng = __import__('numpy').random.default_rng(0)
  files = {'random.pkl': rng.bytes(4096), 'random.pth': rng.bytes(4096), 'empty.pkl': b'',
           'empty.pth': b'', 'list.pkl': pickle.dumps([1, 2, 3]),
           'truncated.pkl': pickle.dumps({'model': {'w': list(range(100))}})[:40]}
  for name, data in files.items():
    (root / name).write_bytes(data)
  (root / 'folder').mkdir()
  torch = pytest.importorskip('torch')
  torch.save({'w': torch.zeros(1000)}, root / 'whole.pth')
  data = (root / 'whole.pth').read_bytes()
  (root / 'truncated.pth').write_bytes(data[:len(data) // 2])
  torch.save([torch.zeros(3)], root / 'list.pth')
  torch.save({'epoch': 3}, root / 'no_tensors.pth')
  return root


@pytest.mark.parametrize('name, reader, says', [
    ('random.pth', convert.load_torch_file, 'is not a readable PyTorch weights'),
    ('truncated.pth', convert.load_torch_file, 'is not a readable PyTorch weights'),
    ('empty.pth', convert.load_torch_file, 'is empty (0 bytes), not a PyTorch weights'),
    ('list.pth', convert.load_torch_file, 'holds a list, not a state_dict'),
    ('folder', convert.load_torch_file, 'is a folder, not a PyTorch weights'),
    ('no_tensors.pth', convert.load_torch_file, 'Could not find a state_dict'),
    ('random.pkl', weights_lib.read_detectron2_pkl, 'is not a readable Detectron2'),
    ('truncated.pkl', weights_lib.read_detectron2_pkl, 'is not a readable Detectron2'),
    ('empty.pkl', weights_lib.read_detectron2_pkl, 'is empty (0 bytes), not a Detectron2'),
    ('list.pkl', weights_lib.read_detectron2_pkl, 'holds a list, not a state_dict'),
    ('folder', weights_lib.read_detectron2_pkl, 'is a folder, not a Detectron2'),
])
def test_unreadable_weights_file_is_one_line_naming_it(bad_files, name, reader, says):
  path = str(bad_files / name)
  with pytest.raises((convert.WeightsFileError, convert.StateDictMismatchError)) as e:
    reader(path)
  message = str(e.value)
  assert message.startswith(path) and says in message, message
  assert len(message.splitlines()) == 1 and 'weights_only' not in message


def test_detector_weights_that_cannot_be_read_stop_the_run_before_it_writes(bad_files,
                                                                            tmp_path):
  config = _detector(weights=str(bad_files / 'random.pkl'))
  with pytest.raises(SetupError, match='random.pkl .* is not a readable Detectron2'):
    train_detector(config, str(tmp_path / 'run'), devices=ONE_DEVICE)
  assert not (tmp_path / 'run').exists()


def _detector(**fields):
  config = digit_scenes_detector.get_config()
  config.update(batch_size=2, eval_batch_size=4, train_subset=8, max_steps=2)
  config.update(fields)
  return config


@pytest.mark.parametrize('fields, says', [
    ({'batch_size': 0}, 'config.batch_size must be >= 1, got 0.'),
    ({'max_boxes': 0}, 'config.max_boxes must be >= 1, got 0.'),
    ({'max_steps': -5}, 'config.max_steps must be >= 0, got -5.'),
    ({'train_subset': 1}, 'config.train_subset=1 is smaller than one batch'),
    ({'pad_size': (64, 64)}, 'raise pad_size to at least (96, 96)'),
    ({'weights': '.'}, "config.weights='.' is a folder, not a weights file"),
])
def test_detection_values_are_checked_before_anything_is_written(tmp_path, fields, says):
  with pytest.raises(SetupError) as e:
    train_detector(_detector(**fields), str(tmp_path / 'run'), devices=ONE_DEVICE)
  assert says in str(e.value)
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('fields, says', [
    ({'batch_size': 0}, 'config.batch_size must be >= 1, got 0.'),
    ({'train_subset': 5}, 'config.train_subset=5 is smaller than one batch'),
    ({'stop_after_step': -1}, 'config.stop_after_step must be >= 0, got -1.'),
    ({'log_every_steps': 0}, 'config.log_every_steps must be >= 1, got 0.'),
])
def test_classification_values_are_checked_before_anything_is_written(tmp_path, fields, says):
  with pytest.raises(SetupError) as e:
    train_and_evaluate(tiny_config(**fields), str(tmp_path / 'run'), devices=ONE_DEVICE)
  assert says in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_storage_fault_says_what_was_kept_and_removes_half_written_saves(tmp_path):
  (tmp_path / 'checkpoints' / '3').mkdir(parents=True)
  partial = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-1796405537'
  (partial / 'state').mkdir(parents=True)
  try:
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'checkpoints/4/state/d/abc')
    except OSError as cause:
      raise ValueError('Failed to save the checkpoint') from cause
  except ValueError as e:
    message = storage_fault(e, str(tmp_path))
  assert message.startswith('The run stopped because the disk is full')
  assert f'newest: step 3 in {tmp_path / "checkpoints"}' in message
  assert partial.name in message and not partial.exists()
  assert (tmp_path / 'checkpoints' / '3').is_dir()
  assert storage_fault(ValueError('a bug'), str(tmp_path)) is None
  # Device memory, not the disk.
  assert storage_fault(RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to '
                                    'allocate 1.2GiB'), str(tmp_path)) is None


def _suite(run_order, **fields):
  config = tiny_config()
  suite = config.__class__()
  # Offline digits (no tfds mock, which would outlive this test in the module): 2 steps.
  run = dict(dataset='digits', train_subset=32, eval_batch_size=64, num_epochs=1)
  suite.runs = {'teacher': tiny_config(**run, **fields),
                'student': tiny_config(**run, seed=1)}
  suite.run_order = run_order
  suite.groups = {'teachers': ('teacher',), 'students': ('student',)}
  suite.compare = ('students', 'teachers')
  return suite


def test_suite_run_order_naming_no_run_is_refused(tmp_path):
  with pytest.raises(SetupError, match="config.run_order names 'studnet', which this suite"):
    train_suite(_suite(('teacher', 'studnet')), str(tmp_path), devices=ONE_DEVICE)
  assert not tmp_path.joinpath('teacher').exists()


@pytest.mark.slow
def test_suite_subset_summarises_and_a_stopped_run_stops_the_suite(tmp_path):
  results = train_suite(_suite(('teacher',)), str(tmp_path / 'subset'), devices=ONE_DEVICE)
  assert list(results) == ['teacher'] and not is_stopped(results)
  assert (tmp_path / 'subset' / 'summary.json').exists()

  results = train_suite(_suite(('teacher', 'student'), stop_after_step=1),
                        str(tmp_path / 'stopped'), devices=ONE_DEVICE)
  assert list(results) == ['teacher'] and is_stopped(results)
  assert not (tmp_path / 'stopped' / 'student').exists()
  assert not (tmp_path / 'stopped' / 'summary.json').exists()


@pytest.mark.parametrize('content, parse, says', [
    (b'', True, 'is empty (0 bytes)'),
    (b'{"images": [{"id": 1}], "annotations": [', True, 'is not valid JSON'),
    (b'{"images": []}', True, 'is not a COCO instances file (no annotations, categories list)'),
    (b'{"images": [], "annotations": [{"id": 1', False, 'is not one whole JSON object'),
])
def test_broken_coco_annotation_file_is_refused_at_setup(tmp_path, content, parse, says):
  from reviewkd_jax.detection import data as det_data  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import detection  # pylint: disable=g-import-not-at-top
  name = 'instances_val2017.json' if parse else 'instances_train2017.json'
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError) as e:
    detection.check_annotation_json(str(tmp_path / name), parse=parse)
  assert str(e.value).startswith(f'The COCO annotation file {tmp_path / name} {says}')
  # Setup reads the evaluation file whole, and with masks checks the training file's ends.
  config = det_data.DetectionDataConfig(dataset='coco/2017', annotations_dir=str(tmp_path),
                                        masks=not parse)
  with pytest.raises(ValueError, match=re.escape(says)):
    detection._check_coco_annotations(config)  # pylint: disable=protected-access


def test_whole_coco_annotation_files_pass(tmp_path):
  from reviewkd_jax.detection import data as det_data  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import detection  # pylint: disable=g-import-not-at-top
  whole = b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}\n'
  for name in ('instances_val2017.json', 'instances_train2017.json'):
    (tmp_path / name).write_bytes(whole)
  detection._check_coco_annotations(det_data.DetectionDataConfig(  # pylint: disable=protected-access
      dataset='coco/2017', annotations_dir=str(tmp_path), masks=True))


def test_half_built_tfds_coco_folder_says_what_to_do(tmp_path):
  from reviewkd_jax.detection import data as det_data  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'coco' / '2017' / '1.1.0'
  folder.mkdir(parents=True)
  (folder / 'dataset_info.json').write_text('{"name": "coco", "splits": [{"name": "tr')
  with pytest.raises(det_data.DetectionDataNotFoundError) as e:
    det_data.create_detection_pipeline(det_data.DetectionDataConfig(
        dataset='coco/2017', data_dir=str(tmp_path)))
  message = str(e.value)
  assert message.startswith(f'The tfds coco/2017 folder in {tmp_path} cannot be read (')
  assert 'Move that folder aside' in message and 'tfds build coco/2017' in message


def test_workdir_that_cannot_be_made_is_refused_before_any_setup(tmp_path, monkeypatch):
  from reviewkd_jax.train import run_core  # pylint: disable=g-import-not-at-top
  (tmp_path / 'a_file').write_text('')
  locked = tmp_path / 'locked'
  locked.mkdir()
  for workdir, says in ((tmp_path / 'a_file' / 'run' / 'x', f'{tmp_path / "a_file"} is a file'),
                        (tmp_path / 'a_file', f'{tmp_path / "a_file"} is a file'),
                        (locked / 'run', f'no permission to write in {locked}')):
    if 'locked' in str(workdir):  # permission bits do not bind root: ask os.access's answer
      monkeypatch.setattr(os, 'access', lambda path, mode: str(path) != str(locked))
    set_up_ran = []
    with pytest.raises(SetupError, match='give a --workdir you can write to') as e:
      run_core.start_run(str(workdir), lambda: set_up_ran.append(1), lambda *_: None)
    assert f'The workdir {workdir} cannot be written ({says}' in str(e.value)
    assert not set_up_ran and not (tmp_path / 'locked' / 'run').exists()
  monkeypatch.undo()
  for workdir in (tmp_path / 'new' / 'deeper', locked, 'gs://bucket/run'):
    run_core.check_workdir_can_be_made(str(workdir))  # creatable, or found out on creation
  assert not (tmp_path / 'new').exists()
