"""Models named by import path ('package.module:Class') in configs: the registry builds them
as backbones, main.py's `set_outputs_from_config` gives them their feature outputs, and the
trainer's ReviewKD step runs on them; one clear message per mistake."""
import os
import subprocess
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from reviewkd_jax import data
from reviewkd_jax.models import create_model, imported
from reviewkd_jax.models import registry
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NETS = '''
import flax.linen as nn


class Stage(nn.Module):
  width: int
  stride: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.width, (3, 3), strides=self.stride, use_bias=False, name='conv')(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))


class Net(nn.Module):
  widths: tuple = (4, 8)
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.widths):
      x = Stage(width, 1 if i == 0 else 2, name=f'stage{i + 1}')(x, train)
    return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))


class Teacher(Net):
  widths: tuple = (8, 16)


def seven_classes():
  return Net(num_classes=7)
'''


@pytest.fixture(name='nets')
def fixture_nets(tmp_path, monkeypatch):
  """Returns the name of a fresh module of networks in tmp_path, importable."""
  name = f'user_nets_{uuid.uuid4().hex[:8]}'
  (tmp_path / f'{name}.py').write_text(NETS)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield name
  for path in (f'{name}:Net', f'{name}:Teacher', f'{name}:seven_classes'):
    registry.set_feature_outputs(path, ())
  sys.modules.pop(name, None)


def _config(nets, **fields):
  config = default.get_config()
  config.update(dataset='digits', model=f'{nets}:Net', teacher=f'{nets}:Teacher',
                method='reviewkd', model_outputs=('stage1,stage2',),
                teacher_outputs=('stage1', 'stage2'), batch_size=8, eval_batch_size=8,
                teacher_weights='unused')
  config.update(fields)
  return config


def test_reviewkd_train_step_on_imported_networks(nets):
  config = _config(nets)
  registry.set_outputs_from_config(config)  # what main.py calls before a run
  spec = data.get_spec('digits')
  mesh = state_lib.make_mesh(jax.devices()[:1])
  run = setup_lib.build_run(config, spec, mesh=mesh, steps_per_epoch=10)
  # The ABFs sized from the teacher: its two named stages and the pooled level.
  assert run.model.teacher_channels == (8, 16, 16)
  assert run.model.teacher_sizes == ((32, 32), (16, 16), (1, 1))
  state = run.init_state()
  assert set(state.params) == {'student', 'abfs_0', 'abfs_1', 'abfs_2'}
  # The backbone's variables are the network's own tree (what `Net().init` gives).
  own = jax.eval_shape(lambda: run.backbone.net.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert (jax.tree.structure(run.backbone_variables(state))
          == jax.tree.structure(dict(own)))
  teacher_vars = jax.jit(lambda k: run.teacher.init(
      k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           'label': np.arange(8, dtype=np.int32), 'index': np.arange(8, dtype=np.int32)}
  state, metrics = run.train_step()(state, batch, teacher_vars)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['hcl']) > 0
  assert int(state.step) == 1


def test_imported_model_features(nets):
  registry.set_feature_outputs(f'{nets}:Net', ['stage1', 'stage2'])
  model = create_model(f'{nets}:Net', num_classes=10)
  assert isinstance(model, imported.ImportedModel) and model.net.num_classes == 10
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False)[0])
  assert out.logits.shape == (2, 10)
  assert [f.shape for f in out.features['stages']] == [(2, 8, 8, 4), (2, 4, 4, 8)]
  assert out.features['pooled'].shape == (2, 8)
  # Without outputs the network trains alone: no features.
  registry.set_feature_outputs(f'{nets}:Net', ())
  out = jax.eval_shape(lambda: create_model(f'{nets}:Net', num_classes=10).init_with_output(
      jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False)[0])
  assert out.features == {}


def test_imported_model_mistakes(nets):
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=r"cannot import 'no_such_pkg.nets'.*PYTHONPATH"):
    create_model('no_such_pkg.nets:Net')
  with pytest.raises(ValueError, match=f"'{nets}' has no attribute 'Nett'. Its Flax modules: "
                     'Net, Stage, Teacher'):
    create_model(f'{nets}:Nett')
  with pytest.raises(ValueError, match='takes no dtype argument'):
    create_model(f'{nets}:Net', dtype=jnp.bfloat16)
  # A function that fixes its own classes: 7 logits on a 10-class dataset.
  model = create_model(f'{nets}:seven_classes', num_classes=10)
  with pytest.raises(imported.FeatureOutputError, match=r'returned \(2, 7\) where the logits '
                     r'\(N, 10\)'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  registry.set_feature_outputs(f'{nets}:Net', ['stage1', 'stage3'])
  model = create_model(f'{nets}:Net', num_classes=10)
  with pytest.raises(imported.FeatureOutputError) as e:
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  for text in (f"Model '{nets}:Net' has no output 'stage3'", 'stage2/bn: (2, 4, 4, 8)',
               'head: (2, 10)'):
    assert text in str(e.value)


@pytest.mark.parametrize('fields, match', [
    ({'model_outputs': ()}, r"config.model='.*:Net' is a model of yours: set "
                            'config.model_outputs'),
    ({'teacher': 'resnet20'}, r"config.teacher_outputs=\('stage1', 'stage2'\) names feature "
                              "outputs, but config.teacher='resnet20' is not"),
    ({'teacher': 'X:Net', 'model': 'X:Net'}, 'both .* but name different feature outputs'),
])
def test_config_mistakes(nets, fields, match):
  with pytest.raises(ValueError, match=match):
    registry.set_outputs_from_config(_config(nets, **fields))


def test_configs_without_the_fields_are_left_alone():
  registry.set_outputs_from_config({'model': 'x:Y'})  # e.g. detection configs


@pytest.mark.slow  # subprocesses of main.py
def test_main_distils_imported_networks_by_import_path(nets, tmp_path):
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), ROOT])}
  main = [sys.executable, 'main.py', '--config=configs/default.py', '--config.dataset=digits',
          '--config.batch_size=16', '--config.eval_batch_size=64', '--config.train_subset=32',
          '--config.num_epochs=1']
  run = lambda *args: subprocess.run([*main, *args], cwd=ROOT, env=env, capture_output=True,
                                     text=True, timeout=600, check=False)
  # The teacher alone (its outputs are not needed, and harmless).
  proc = run(f'--workdir={tmp_path / "teacher"}', f'--config.model={nets}:Teacher',
             '--config.model_outputs=stage1,stage2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Done: final top-1' in proc.stderr and (tmp_path / 'teacher' / 'final').is_dir()
  kd = [f'--workdir={tmp_path / "kd"}', '--config.method=reviewkd', f'--config.model={nets}:Net',
        f'--config.teacher={nets}:Teacher', '--config.teacher_outputs=stage1,stage2',
        f'--config.teacher_weights={tmp_path / "teacher"}']
  # ReviewKD without the student's outputs: refused before anything runs.
  proc = run(*kd)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'is a model of yours: set config.model_outputs' in proc.stderr
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'kd').exists()
  # With them: the epoch (two steps) distilled from the teacher trained above.
  proc = run(*kd, '--config.model_outputs=stage1,stage2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Teacher {nets}:Teacher from best model of {tmp_path / 'teacher'}" in proc.stderr
  assert 'hcl' in proc.stderr and 'Done: final top-1' in proc.stderr
