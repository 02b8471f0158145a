"""TensorFlow, tfds and clu's writers are imported only when a pipeline or a writer is made:
the library's modules and main.py load without them, so a setup mistake is refused at once."""
import os
import subprocess
import sys
import types

import pytest

from reviewkd_jax import lazy_imports
from tests.helpers import ROOT

_HEAVY = ('tensorflow', 'tensorflow_datasets', 'clu.metric_writers')


def test_library_and_main_import_without_tensorflow():
  code = ('import sys\n'
          'import main\n'
          'from reviewkd_jax import data, distill, losses, models, train\n'
          'from reviewkd_jax.data import datasets, image_folder, pipeline, preprocess\n'
          'from reviewkd_jax.detection import coco_json, data as detection_data\n'
          'from reviewkd_jax.train import detection, progress, run_core, trainer\n'
          f'print(sorted(m for m in {_HEAVY!r} if m in sys.modules))\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == '[]', proc.stdout


def test_stand_in_reads_the_real_module_at_each_access(monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  stand_in = lazy_imports.LazyModule('json')
  assert stand_in.dumps([1]) == '[1]'
  monkeypatch.setattr(json, 'dumps', lambda value: 'patched')  # as tfds.testing.mock_data does
  assert stand_in.dumps([1]) == 'patched'
  assert 'imported' in repr(stand_in)
  with pytest.raises(AttributeError):
    stand_in.__wrapped__  # pylint: disable=pointless-statement
  with pytest.raises(AttributeError):
    stand_in.no_such_name  # pylint: disable=pointless-statement


def test_tensorflow_is_kept_off_gpus_once_asked(monkeypatch):
  calls = []

  def set_visible_devices(devices, kind):
    calls.append((devices, kind))
    if len(calls) > 1:
      raise RuntimeError('Visible devices cannot be modified after being initialized')

  fake = types.SimpleNamespace(config=types.SimpleNamespace(
      experimental=types.SimpleNamespace(set_visible_devices=set_visible_devices)))
  monkeypatch.setitem(sys.modules, 'tensorflow', fake)
  monkeypatch.setattr(lazy_imports, '_keep_off_gpus', False)
  monkeypatch.setattr(lazy_imports, '_gpus_hidden', False)
  assert lazy_imports.LazyModule('tensorflow').config is fake.config and not calls
  lazy_imports.keep_tensorflow_off_gpus()      # imported already: applied at once
  assert calls == [([], 'GPU')]
  monkeypatch.setattr(lazy_imports, '_gpus_hidden', False)
  lazy_imports.load('tensorflow')              # TensorFlow has initialised its devices
  assert len(calls) == 2 and lazy_imports._gpus_hidden  # pylint: disable=protected-access
