"""TensorFlow, tfds and clu's writers are imported only when a pipeline or a writer is made:
the library's modules and main.py load without them, so a setup mistake is refused at once."""
import os
import subprocess
import sys

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
          f'print(sorted(m for m in {_HEAVY!r} if m in sys.modules))\n'
          'from reviewkd_jax.lazy_imports import tf\n'
          'print(int(tf.constant(2) + 1), "tensorflow" in sys.modules)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split('\n')[:2] == ['[]', '3 True'], proc.stdout


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
