"""The comparison methods in the training system: each trains on 1 and 8 devices, CRD's memory
bank through the trainer, OFD's margins, and the Table 1 configs.

A resnet8 student learns from a resnet8x4 teacher (other widths on every stage, so every
regressor, connector and embedding maps channels) on 56 mock CIFAR-100 examples, batches
of 16. Every method also adds the logit KD term (kd_weight 0.5), as any method may.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import cifar100_table1, default, pairs
from reviewkd_jax import data
from reviewkd_jax.distill import ofd
from reviewkd_jax.models import create_model
from reviewkd_jax.models import layers
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import teacher as teacher_lib
from reviewkd_jax.train import check_config, get_method, list_methods, train_and_evaluate
from tests.helpers import NUM_MOCK_EXAMPLES as NUM_EXAMPLES
from tests.helpers import ONE_DEVICE, ROOT, tiny_config

STUDENT, TEACHER = 'resnet8', 'resnet8x4'
# 1 vs 8 devices differ only in the order of float reductions (the same global batch, the
# same BatchNorm statistics, the same random negatives): every logged loss agrees to rtol
# 2e-4 (measured: <= 1e-6 for most terms, 1e-4 for RKD's N^3 angles), atol 1e-5; PKT's term
# gets atol 3e-4: it is 30000 x a KL of ~1e-6 between two nearly equal kernels, whose
# float32 rounding is ~7e-5 after the weight (2.9e-3 relative, measured).
LOSS_RTOL_1_VS_8, LOSS_ATOL_1_VS_8, PKT_ATOL_1_VS_8 = 2e-4, 1e-5, 3e-4
COMPARISON_METHODS = [m for m in list_methods() if m not in ('none', 'reviewkd')]
pytestmark = pytest.mark.usefixtures('mock_cifar100')


def _tiny(method, **fields):
  return tiny_config(**{'model': STUDENT, 'teacher': TEACHER, 'method': method,
                        'eval_teacher': False, 'kd_weight': 0.5, **fields})


@pytest.fixture(scope='module')
def mock_data(mock_cifar100):
  """(spec sized to the mock split, its 3 training batches of epoch 0, all train labels)."""
  del mock_cifar100
  pipeline = data.create_input_pipeline(_tiny('kd'))
  spec = dataclasses.replace(data.get_spec('cifar100'), num_train=pipeline.num_train)
  return spec, list(pipeline.train_batches(0)), pipeline.source.train_labels


def _random_variables(model, seed):
  """Returns `model`'s variables drawn on the host: unit-gain kernels, spread-out BatchNorms.

  (A stand-in for trained weights that costs no XLA compilation; OFD's margins then differ
  per channel.)
  """
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name in ('bias', 'mean'):
      return rng.normal(0.0, 0.3, s.shape).astype(np.float32)
    return rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def teacher_variables():
  """The frozen resnet8x4 teacher's variables."""
  return _random_variables(create_model(TEACHER), seed=7)


_INITIAL_STATES = {}


def _initial_state(run):
  """Returns the host copy of `run.init_state()`, computed once per module structure."""
  key = repr(run.model)
  if key not in _INITIAL_STATES:
    # The non-partitionable threefry compiles the initialisers ~3x faster on XLA:CPU; the
    # initial values need only be the same for the 1- and 8-device runs.
    with jax.threefry_partitionable(False):
      state = run.init_state()
    _INITIAL_STATES[key] = jax.device_get(state)
  return _INITIAL_STATES[key]


def _train_steps(config, devices, mock_data, teacher_variables):
  """Runs the trainer's step (built as the trainer builds it) over the 3 mock batches.

  One step per epoch, so epoch-dependent terms (DKD's warm-up) move at every step.
  Returns (initial host state, final host state, per-step host metrics).
  """
  spec, batches, train_labels = mock_data
  mesh = state_lib.make_mesh(devices)
  run = setup_lib.build_run(config, spec, mesh=mesh, steps_per_epoch=1)
  initial = _initial_state(run)
  state = jax.device_put(initial, state_lib.replicated(mesh))
  tvars = jax.device_put(teacher_variables, state_lib.replicated(mesh))
  constants = run.method.prepare(config, spec, teacher=run.teacher, teacher_variables=tvars,
                                 train_labels=train_labels)
  train_step = run.train_step(constants)
  history = []
  for batch in batches:
    state, metrics = train_step(state, jax.device_put(batch, state_lib.batch_sharded(mesh)),
                                tvars)
    history.append(jax.device_get(metrics))
  return initial, jax.device_get(state), history


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow  # three train steps per method, compiled for 1 and for 8 devices
@pytest.mark.parametrize('method', COMPARISON_METHODS)
def test_method_trains_the_same_on_1_and_8_devices(method, mock_data, teacher_variables):
  assert jax.device_count() == 8
  config = _tiny(method)
  initial, one, hist_1 = _train_steps(config, ONE_DEVICE, mock_data, teacher_variables)
  _, eight, hist_8 = _train_steps(config, jax.devices(), mock_data, teacher_variables)

  term = f'loss_{method}'
  for h in hist_1:
    assert all(np.isfinite(v) for v in h.values()), h
    terms = {k: v for k, v in h.items() if k.startswith('loss_')}
    assert set(terms) == {'loss_ce', 'loss_kd', term}
    np.testing.assert_allclose(h['loss'], sum(terms.values()), rtol=1e-5)
    assert h[term] > 0 and h['loss_kd'] > 0
    np.testing.assert_allclose(h['kd'] * config.kd_weight, h['loss_kd'], rtol=1e-6)
  for key in hist_1[0]:
    atol = PKT_ATOL_1_VS_8 if key == 'loss_pkt' else LOSS_ATOL_1_VS_8
    np.testing.assert_allclose([h[key] for h in hist_8], [h[key] for h in hist_1],
                               rtol=LOSS_RTOL_1_VS_8, atol=atol, err_msg=key)

  # The student and the method's head (if any) learn; the exported backbone is the student.
  before, after = _flat(initial.params), _flat(one.params)
  assert set(before) == set(after)
  assert all(k.startswith(("['student']", "['head']")) for k in before)  # no teacher
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any(k.startswith("['student']") for k in changed)
  head = {k for k in before if k.startswith("['head']")}
  assert head <= changed, head - changed
  assert bool(head) == (method in ('fitnet', 'vid', 'ofd', 'crd'))
  backbone = get_method(method).backbone_variables({'params': one.params, **one.model_state})
  assert set(backbone) == {'params', 'batch_stats'}
  assert set(backbone['params']) == set(initial.params['student'])

  if method == 'dkd':  # mdistiller's 1-based warm-up: epochs 0, 1, 2 weigh 1/20, 2/20, 3/20
    np.testing.assert_allclose([h['dkd_warmup'] for h in hist_1], [0.05, 0.1, 0.15],
                               rtol=1e-6)
  if method == 'crd':
    _assert_bank_updated_at_batch_indices(initial, one, mock_data[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 eight.model_state['memory'], one.model_state['memory'])


def _assert_bank_updated_at_batch_indices(initial, final, batches):
  """Checks that exactly the rows of the batches' examples moved, and Z was set."""
  visited = np.unique(np.concatenate([b['index'] for b in batches]))
  old = initial.model_state['memory']['head']['crd']['contrast']
  new = final.model_state['memory']['head']['crd']['contrast']
  np.testing.assert_array_equal(old['z'], [-1.0, -1.0])
  assert np.all(new['z'] > 0)
  for name in ('memory_v1', 'memory_v2'):
    assert new[name].shape == (NUM_EXAMPLES, 128)
    np.testing.assert_allclose(np.linalg.norm(new[name][visited], axis=1), 1.0, rtol=1e-5)
    others = np.setdiff1d(np.arange(NUM_EXAMPLES), visited)
    np.testing.assert_array_equal(new[name][others], old[name][others])
    assert not np.allclose(new[name][visited], old[name][visited])


# ------------------------------------------------------------------ CRD through the trainer


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory, teacher_variables):
  """A workdir holding the teacher as this project's trainer exports models."""
  workdir = tmp_path_factory.mktemp('teacher')
  ckpts = checkpoint_lib.RunCheckpoints(str(workdir), keep=1)
  ckpts.save_model(checkpoint_lib.BEST, 0, teacher_variables,
                   {'model': TEACHER, 'dataset': 'cifar100', 'step': 0, 'epoch': 0})
  ckpts.close()
  return workdir


def _crd_run(workdir, teacher_workdir, **fields):
  config = _tiny('crd', teacher_weights=str(teacher_workdir), **fields)
  return train_and_evaluate(config, str(workdir), devices=ONE_DEVICE)


@pytest.mark.slow
def test_crd_memory_bank_trains_checkpoints_and_resumes(tmp_path, teacher_workdir, mock_data):
  """Through the trainer: the bank is updated at the batch's rows, saved, restored, continued."""
  stopped = _crd_run(tmp_path, teacher_workdir, num_epochs=1, stop_after_step=2)
  assert stopped.step == 2 and stopped.final is None
  resumed = _crd_run(tmp_path, teacher_workdir, num_epochs=1)
  assert resumed.step == 3 and [h['step'] for h in resumed.history] == [3]
  assert all(np.isfinite(h['loss_crd']) and h['loss_crd'] > 0
             for h in stopped.history + resumed.history)

  bank_2 = jax.device_get(stopped.state.model_state['memory'])['head']['crd']['contrast']
  bank_3 = jax.device_get(resumed.state.model_state['memory'])['head']['crd']['contrast']
  # Step 3 moved exactly its batch's rows of the bank it restored: every other row and Z
  # are the step-2 values (a bank re-initialised at resume would differ everywhere).
  third = mock_data[1][2]['index']
  others = np.setdiff1d(np.arange(NUM_EXAMPLES), third)
  np.testing.assert_array_equal(bank_3['z'], bank_2['z'])
  assert np.all(bank_2['z'] > 0)
  for name in ('memory_v1', 'memory_v2'):
    np.testing.assert_array_equal(bank_3[name][others], bank_2[name][others])
    assert not np.allclose(bank_3[name][third], bank_2[name][third])
    np.testing.assert_allclose(np.linalg.norm(bank_3[name][third], axis=1), 1.0, rtol=1e-5)
  # The exported model is the plain student: no heads, no memory bank.
  variables, meta = checkpoint_lib.load_model(
      f'{resumed.workdir}/final',
      teacher_lib.variables_template(create_model(STUDENT), (32, 32, 3)),
      sharding=state_lib.replicated(state_lib.make_mesh(ONE_DEVICE)), expect_model=STUDENT)
  assert meta['method'] == 'crd' and set(variables) == {'params', 'batch_stats'}


def test_crd_needs_dataset_indices(mock_data):
  spec, _, _ = mock_data
  method = get_method('crd')
  with pytest.raises(ValueError, match="needs each example's dataset index"):
    method.prepare(_tiny('crd'), dataclasses.replace(spec, name='imagenet2012'), teacher=None,
                   teacher_variables=None, train_labels=None)


# ------------------------------------------------------------------ OFD's margins


@pytest.mark.parametrize('name', ['resnet8x4', 'wrn_16_2', 'vgg8', 'ResNet50'])
def test_ofd_bn_paths_name_the_bn_before_each_preact_map(name):
  """WRN and VGG: the BN output *is* the pre-ReLU map; ResNets: map = BN output + shortcut."""
  model = create_model(name)
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _random_variables(model, seed=2)

  @jax.jit
  def run(v):
    (_, feats), inter = model.apply(
        v, x, train=False, capture_intermediates=lambda m, _: isinstance(m, layers.BatchNorm),
        mutable=['intermediates'])
    return feats['preact'], inter['intermediates']

  preact, bn_out = run(variables)
  paths = ofd.ofd_bn_paths(model)
  assert len(paths) == len(preact)
  for path, pre in zip(paths, preact):
    out = bn_out
    for k in path.split('/'):
      out = out[k]
    out = out['__call__'][0]
    assert out.shape == pre.shape, path
    if name.startswith(('wrn', 'vgg')):
      np.testing.assert_array_equal(out, pre)
    else:  # the residual branch's last BN; the shortcut is what remains
      assert not np.allclose(out, pre)
  margins = ofd.ofd_margins_from_params(variables['params'], paths)
  assert [m.shape[0] for m in margins] == [p.shape[-1] for p in preact]


def test_ofd_margins_come_from_the_loaded_teacher(mock_data, teacher_variables):
  spec = mock_data[0]
  teacher = create_model(TEACHER)
  constants = get_method('ofd').prepare(_tiny('ofd'), spec, teacher=teacher,
                                        teacher_variables=teacher_variables, train_labels=None)
  p = teacher_variables['params']
  assert ofd.ofd_bn_paths(teacher) == ['layer1_0/bn2', 'layer2_0/bn2', 'layer3_0/bn2']
  for margin, layer in zip(constants['margins'], ('layer1_0', 'layer2_0', 'layer3_0')):
    np.testing.assert_array_equal(margin, ofd.ofd_margin(p[layer]['bn2']['scale'],
                                                       p[layer]['bn2']['bias']))
  assert len({round(float(v), 4) for v in constants['margins'][0]}) > 10  # spread BN params


def test_ofd_refuses_a_teacher_without_bn_margins():
  with pytest.raises(ValueError, match='not for ShuffleNetV1'):
    check_config(_tiny('ofd', teacher='ShuffleV1'))


# ------------------------------------------------------------------ configs and checks


def test_every_table1_config_passes_its_methods_checks():
  for pair in cifar100_table1.PAIRS:
    teacher, student = pairs.get(pair).teacher, pairs.get(pair).student
    for method in cifar100_table1.METHODS:
      config = cifar100_table1.get_config(f'pair={pair},method={method}')
      assert get_method(config.method) is check_config(config)
      assert (config.teacher, config.model, config.method) == (teacher, student, method)
      if method == 'reviewkd':
        pair_file = __import__(f'configs.cifar100_{pair}', fromlist=['get_config'])
        assert config == pair_file.get_config()
        continue
      # RepDistiller's train_student.py recipe.
      assert (config.batch_size, config.learning_rate, config.base_batch_size) == (64, 0.05, 64)
      assert config.momentum == 0.9 and not config.nesterov and config.weight_decay == 5e-4
      assert tuple(config.lr_decay_epochs) == (150, 180, 210) and config.num_epochs == 240
      assert config.teacher_bn_mode == ('batch_stats' if method == 'ofd' else 'eval')
      assert (config.ce_weight, config.kd_weight) == ((0.1, 0.9) if method == 'kd' else
                                                      (1.0, 0.0))
  assert cifar100_table1.get_config('pair=r56_r20,method=dkd').dkd_beta == 2.0
  assert cifar100_table1.get_config('pair=r32x4_r8x4,method=dkd').dkd_beta == 8.0


def test_method_defaults_are_the_benchmarks():
  c = default.get_config()
  assert (c.kd_temperature, c.fitnet_weight, c.fitnet_hint_layer, c.at_weight, c.pkt_weight,
          c.rkd_distance_weight, c.rkd_angle_weight, c.crd_weight, c.vid_weight,
          c.ofd_weight) == (4.0, 100.0, 2, 1000.0, 30000.0, 25.0, 50.0, 0.8, 1.0, 1e-3)
  assert (c.crd_feat_dim, c.crd_num_negatives, c.crd_temperature, c.crd_momentum,
          c.crd_negatives) == (128, 16384, 0.07, 0.5, 'other_class')
  assert (c.dkd_alpha, c.dkd_beta, c.dkd_temperature, c.dkd_warmup_epochs) == (1.0, 8.0, 4.0,
                                                                                 20)


def test_table1_config_from_the_command_line():
  argv = ['main.py', f'--config={ROOT}/configs/cifar100_table1.py:pair=vgg13_vgg8,method=crd',
          '--config.crd_weight=1.5']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  assert (values.config.model, values.config.method, values.config.crd_weight) == (
      'vgg8', 'crd', 1.5)


@pytest.mark.parametrize('arg', [None, 'pair=r56_r20', 'pair=r20_r56,method=kd',
                                 'pair=r56_r20,method=fitnets', 'r56_r20,crd'])
def test_table1_bad_arguments_list_the_choices(arg):
  with pytest.raises(ValueError, match='r56_r20, r110_r32, .*vgg13_vgg8 and METHOD one of '
                                       'at, crd, dkd, fitnet, kd, ofd, pkt, reviewkd, rkd, vid'):
    cifar100_table1.get_config(arg)


@pytest.mark.parametrize('fields,match', [
    (dict(method='kd', kd_weight=0.0), "method='kd' is ce_weight"),
    (dict(method='crd', crd_negatives='exact'), 'crd_negatives must be one of'),
    (dict(method='dkd', dkd_warmup_epochs=-1), 'dkd_warmup_epochs'),
    (dict(method='fitnet', kd_weight=-1.0), 'kd_weight must be >= 0'),
    (dict(method='at', teacher=''), 'distils from a teacher'),
])
def test_bad_method_settings_fail_with_a_message(fields, match):
  with pytest.raises(ValueError, match=match):
    check_config(_tiny(**fields))


def test_mismatched_networks_fail_at_build(mock_data):
  spec = mock_data[0]
  for method in ('at', 'vid', 'ofd'):
    config = _tiny(method, teacher='vgg8')  # 4 stages against resnet8's 3
    with pytest.raises(ValueError, match='pairs the stages one to one'):
      get_method(method).build(config, spec, jnp.float32)
  with pytest.raises(ValueError, match='fitnet_hint_layer=4'):
    get_method('fitnet').build(_tiny('fitnet', fitnet_hint_layer=4), spec, jnp.float32)


def test_crd_clips_negatives_to_the_dataset(mock_data):
  spec = mock_data[0]
  model, _ = get_method('crd').build(_tiny('crd'), spec, jnp.float32)
  assert (model.head.num_data, model.head.num_negatives) == (NUM_EXAMPLES, NUM_EXAMPLES - 1)
  full, _ = get_method('crd').build(_tiny('crd'), data.get_spec('cifar100'), jnp.float32)
  assert (full.head.num_data, full.head.num_negatives) == (50000, 16384)


def test_crd_uniform_negatives_trace(mock_data):
  """'uniform' draws K negatives over the whole bank instead of the other classes."""
  spec = mock_data[0]
  model, _ = get_method('crd').build(_tiny('crd', crd_negatives='uniform'), spec, jnp.float32)
  x = jnp.zeros((4, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  inputs = dict(teacher_pooled=jnp.zeros((4, 256)), index=jnp.arange(4), labels=jnp.zeros(4, int),
                key=jax.random.PRNGKey(1), class_index=None)
  (_, _, scores), _ = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=['batch_stats', 'memory'], **inputs),
      variables)
  assert [s.shape for s in scores] == [(4, NUM_EXAMPLES), (4, NUM_EXAMPLES)]
  assert jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).adapter is None
