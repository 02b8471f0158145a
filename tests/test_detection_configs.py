"""Every detection config of the paper's COCO tables builds its detectors; mistakes are one
message before anything runs (no COCO needed)."""
import pytest

from configs import coco_detector, coco_distill, demo_digit_scenes, detection_default
from configs import digit_scenes_detector
from reviewkd_jax.detection import data as det_data
from reviewkd_jax.detection import backbone as backbone_lib
from reviewkd_jax.detection import model as model_lib
from reviewkd_jax.train import SetupError
from reviewkd_jax.train.detection import METHODS, detector_config, train_detector
from tests.helpers import ONE_DEVICE


@pytest.mark.parametrize('model', sorted(coco_detector.DETECTORS))
def test_every_detector_config_builds(model):
  config = coco_detector.get_config(f'model={model}')
  det = detector_config(config, 80)
  assert det.backbone == config.backbone in backbone_lib.BACKBONES
  assert det.mask == model.startswith('mask')
  assert det.num_classes == det.roi.num_classes == 80
  assert config.published  # the slides' numbers of the row


def test_every_detection_config_file_is_checked_here():
  from tests.test_configs import DETECTION_FILES  # pylint: disable=g-import-not-at-top
  here = {'coco_detector', 'coco_distill', 'detection_default', 'digit_scenes_detector',
          'demo_digit_scenes'}
  assert set(DETECTION_FILES) == here


@pytest.mark.parametrize('config', [
    detection_default.get_config(), digit_scenes_detector.get_config(),
    *demo_digit_scenes.get_config().runs.values()])
def test_plain_and_offline_detection_configs_build(config):
  det = detector_config(config, 10)
  assert det.fpn_channels == config.fpn_channels
  data_config = det_data.DetectionDataConfig.from_config(config, masks=config.mask)
  assert data_config.pad_size == tuple(config.pad_size)
  if config.method != 'none':
    assert detector_config(config, 10, teacher=True).backbone == config.teacher_backbone


def test_every_row_of_the_slides_is_a_config():
  rows = [(p, m) for p, (_, _, _, published) in coco_distill.PAIRS.items() for m in published]
  assert len(rows) == 2 * 5 + 3 * 2   # Faster R-CNN: 5 rows per pair; Mask R-CNN: 2
  for pair, method in rows:
    config = coco_distill.get_config(f'pair={pair},method={method}')
    assert config.method in METHODS
    # The teacher's input rules come from its file (a Detectron2 zoo .pkl: MSRA's).
    assert all(config['teacher_' + f] is None for f in model_lib.InputConvention._fields)
    teacher = detector_config(config, 80, teacher=True)
    assert detector_config(config, 80).mask == teacher.mask
  assert coco_distill.get_config('pair=faster_r18_r101,method=reviewkd').reviewkd_weight == 1.2
  assert coco_distill.get_config('pair=mask_mv2_r50,method=reviewkd').reviewkd_weight == 1.0
  with pytest.raises(ValueError, match='methods none, reviewkd only'):
    coco_distill.get_config('pair=mask_r18_r101,method=kd')


def test_missing_teacher_or_data_stops_with_what_to_prepare(tmp_path):
  config = coco_distill.get_config('pair=faster_r18_r101,method=reviewkd')
  with pytest.raises(SetupError, match='teacher_weights'):
    train_detector(config, str(tmp_path / 'a'), devices=ONE_DEVICE)
  config = coco_detector.get_config('model=faster_rcnn_r18_fpn')
  config.data_dir = str(tmp_path / 'no_coco')
  with pytest.raises(SetupError, match='coco/2017'):
    train_detector(config, str(tmp_path / 'b'), devices=ONE_DEVICE)
  config = digit_scenes_detector.get_config()
  config.method = 'reviewkdd'
  with pytest.raises(SetupError, match='not a detection method'):
    train_detector(config, str(tmp_path / 'c'), devices=ONE_DEVICE)
  assert not any(tmp_path.iterdir())


def test_a_suite_keeps_its_compiled_programs_in_the_workdir_while_it_trains(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import suite as suite_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'compilation_cache': True})
  cache = suite_lib._compilation_cache  # pylint: disable=protected-access
  users = jax.config.jax_compilation_cache_dir  # the tests' own (conftest.py)
  assert users
  with cache(config, str(tmp_path)):  # a directory the user set is kept
    assert jax.config.jax_compilation_cache_dir == users
  try:
    compilation_cache.set_cache_dir(None)
    with cache(config, str(tmp_path)):
      assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'compilation_cache')
    assert jax.config.jax_compilation_cache_dir is None
    config.compilation_cache = False
    with cache(config, str(tmp_path)):
      assert jax.config.jax_compilation_cache_dir is None
  finally:
    compilation_cache.set_cache_dir(users)
    compilation_cache.reset_cache()


def test_demo_students_of_every_seed_compile_the_same_programs():
  config = demo_digit_scenes.get_config()
  assert config.compilation_cache
  for group in ('student', 'reviewkd'):
    first, *others = [config.runs[n].to_dict() for n in config.run_order if n.startswith(group)]
    for other in others:
      assert {k for k in first if first[k] != other[k]} == {'seed'}
