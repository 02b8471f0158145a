"""main.py as a user runs it: an ImageNet config on a machine without ImageNet."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # subprocesses of main.py


def test_imagenet_config_without_data_says_what_to_do(tmp_path):
  env = {**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')}
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/imagenet_r34_r18.py',
       f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  for text in ('ImageNet (tfds "imagenet2012") is not prepared', 'ILSVRC2012_img_train.tar',
               'ILSVRC2012_img_val.tar', str(tmp_path / 'tfds' / 'downloads' / 'manual'),
               'tfds build imagenet2012'):
    assert text in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_misspelt_config_field_is_a_clear_error_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/cifar100_r56_r20.py',
       f'--workdir={tmp_path / "run"}', '--config.learnig_rate=0.05'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Unknown config field 'learnig_rate'" in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_config_argument_in_the_old_style_says_the_new_one(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/cifar100_baseline.py:resnet56',
       f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'did you mean model=resnet56?' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run').exists()
