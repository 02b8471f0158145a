"""Every config instantiates, passes the config checks and builds its networks."""
import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from reviewkd_jax import data  # noqa: E402
from reviewkd_jax.train import check_config, get_method  # noqa: E402

CONFIG_FILES = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def _module(name):
  return importlib.import_module(f'configs.{name}')


def _all_configs():
  """Yields (id, config) for every config, every argument and every run of a suite."""
  for name in CONFIG_FILES:
    module = _module(name)
    if name == 'cifar100_baseline':
      variants = [(m, module.get_config(m)) for m in module.LEARNING_RATES]
    elif name == 'imagenet_baseline':
      variants = [(m, module.get_config(m)) for m in module.MODELS]
    elif name == 'cifar100_table1':
      # The methods whose modules depend on the pair's features (kd, pkt, rkd and dkd build
      # the same networks as at; reviewkd is the pair files' config).
      variants = [(f'pair={p},method={m}', module.get_config(f'pair={p},method={m}'))
                  for p in module.PAIRS for m in ('fitnet', 'at', 'vid', 'ofd', 'crd')]
    else:
      variants = [('', module.get_config())]
    for arg, config in variants:
      runs = config.runs.items() if 'runs' in config else [('', config)]
      for run_name, run in runs:
        yield ':'.join(p for p in (name, arg, run_name) if p), run


ALL = list(_all_configs())


def test_every_paper_experiment_has_a_config():
  expected = {
      'cifar100_r56_r20', 'cifar100_r110_r32', 'cifar100_r32x4_r8x4',
      'cifar100_wrn40x2_wrn16x2', 'cifar100_wrn40x2_wrn40x1', 'cifar100_vgg13_vgg8',
      'cifar100_wrn40x2_shufflev1', 'cifar100_r32x4_shufflev1', 'cifar100_r32x4_shufflev2',
      'cifar100_r50_vgg8', 'cifar100_r50_mobilenetv2', 'cifar100_vgg13_mobilenetv2',
      'imagenet_r34_r18', 'imagenet_r50_mobilenet', 'cifar100_baseline', 'imagenet_baseline',
      'default', 'demo_digits'}
  assert expected <= set(CONFIG_FILES)
  # Every teacher and student of the pairs has a baseline config.
  pairs = [c for n, c in ALL if n.startswith('cifar100_') and c.method == 'reviewkd']
  networks = {c.model for c in pairs} | {c.teacher for c in pairs}
  assert networks <= set(_module('cifar100_baseline').LEARNING_RATES)


@pytest.mark.parametrize('name,config', ALL, ids=[n for n, _ in ALL])
def test_config_builds_its_networks(name, config):
  method = check_config(config)
  spec = data.get_spec(config.dataset)
  model, teacher = method.build(config, spec, jnp.float32)
  x = jnp.zeros((1, *spec.image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out[0].shape == (1, spec.num_classes), name
  assert (teacher is not None) == (config.method != 'none')
  if not name.startswith('demo'):  # the paper's configs run on 8-device hosts as they are
    assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0


@pytest.mark.parametrize('name,lam,lr', [
    ('cifar100_r56_r20', 0.6, 0.1), ('cifar100_r110_r32', 1.0, 0.1),
    ('cifar100_r32x4_r8x4', 5.0, 0.1), ('cifar100_wrn40x2_wrn16x2', 5.0, 0.1),
    ('cifar100_r32x4_shufflev2', 8.0, 0.02), ('cifar100_r50_mobilenetv2', 5.0, 0.02)])
def test_cifar_pairs_use_the_authors_settings(name, lam, lr):
  config = _module(name).get_config()
  assert (config.reviewkd_weight, config.learning_rate) == (lam, lr)
  assert config.teacher_bn_mode == 'batch_stats' and config.reviewkd_warmup_epochs == 20
  assert (config.student_features, config.teacher_features) == ('stages', 'preact')
  assert config.nesterov and config.weight_decay == 5e-4 and config.batch_size == 128
  assert tuple(config.lr_decay_epochs) == (151, 181, 211) and config.num_epochs == 240


# Feature kinds as the authors' code computes them: their ResNets' in-place ReLU makes every
# ResNet feature post-ReLU ('stages'); their MobileNet's F.relu leaves its features pre-ReLU.
@pytest.mark.parametrize('name,lam,mid,features', [
    ('imagenet_r34_r18', 1.0, 0, ('stages', 'stages')),
    ('imagenet_r50_mobilenet', 8.0, 256, ('preact', 'stages'))])
def test_imagenet_pairs_use_the_authors_settings(name, lam, mid, features):
  config = _module(name).get_config()
  assert (config.reviewkd_weight, config.mid_channels) == (lam, mid)
  assert config.teacher_bn_mode == 'eval' and config.reviewkd_warmup_epochs == 0
  assert (config.student_features, config.teacher_features) == features
  assert not config.nesterov and config.weight_decay == 1e-4 and config.batch_size == 256
  assert tuple(config.lr_decay_epochs) == (30, 60, 90) and config.num_epochs == 100


def _parse(argv):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides_and_typos():
  config = _parse(['main.py', f'--config={ROOT}/configs/cifar100_baseline.py:resnet56',
                   '--config.num_epochs=3', '--config.lr_decay_epochs=(1,2)'])
  assert config.model == 'resnet56' and config.num_epochs == 3
  assert tuple(config.lr_decay_epochs) == (1, 2)
  with pytest.raises((flags.Error, AttributeError), match='Did you mean "num_epochs"'):
    _parse(['main.py', f'--config={ROOT}/configs/default.py', '--config.num_epoch=3'])


@pytest.mark.parametrize('field,value,match', [
    ('model', 'ResNet20', "Did you mean 'resnet20'"),
    ('method', 'fitnets', 'Unknown method'),
    ('dataset', 'cifar10', 'Unknown dataset'),
    ('teacher_bn_mode', 'train', 'teacher_bn_mode'),
    ('dtype', 'float16', 'config.dtype'),
])
def test_bad_configs_fail_with_a_message(field, value, match):
  config = _module('cifar100_r56_r20').get_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    check_config(config)


def test_method_none_refuses_a_teacher():
  config = _module('default').get_config()
  config.teacher = 'resnet56'
  with pytest.raises(ValueError, match="method='none' trains config.model alone"):
    check_config(config)


def test_unknown_method_lists_the_known_ones():
  with pytest.raises(ValueError, match='Known methods: at, crd, dkd, fitnet, kd, none, ofd, '
                                       r'pkt, reviewkd, rkd, vid\.'):
    get_method('crd_v2')
