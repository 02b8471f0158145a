"""Every config instantiates, passes the config checks and builds its networks; the pair table
(configs/pairs.py) and the one argument parser (configs/args.py) behave as documented."""
import dataclasses
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import args, pairs
from configs import cifar100_baseline, cifar100_table1, imagenet_baseline
from reviewkd_jax import data
from reviewkd_jax.models import list_models
from reviewkd_jax.train import check_config, get_method, list_methods
from tests.helpers import ROOT

# The detection configs (their own checks: tests/test_detection_configs.py).
DETECTION_FILES = ('coco_detector', 'coco_distill', 'detection_default',
                   'digit_scenes_detector', 'demo_digit_scenes')
CONFIG_FILES = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'args', 'pairs', 'suites', *DETECTION_FILES))
PARAMETERISED = ('cifar100_baseline', 'imagenet_baseline', 'cifar100_table1',
                 'cifar100_ablation_stages', 'cifar100_ablation_components')


def _module(name):
  return importlib.import_module(f'configs.{name}')


def _all_configs():
  """Yields (id, config) for every config, every argument and every run of a suite."""
  for name in CONFIG_FILES:
    module = _module(name)
    if name in ('cifar100_baseline', 'imagenet_baseline'):
      variants = [(f'model={m}', module.get_config(f'model={m}'))
                  for m in module.ARGS['model']]
    elif name == 'cifar100_table1':
      # The methods whose modules depend on the pair's features (kd, pkt, rkd and dkd build
      # the same networks as at; reviewkd is the pair files' config).
      variants = [(f'pair={p},method={m}', module.get_config(f'pair={p},method={m}'))
                  for p in module.PAIRS for m in ('fitnet', 'at', 'vid', 'ofd', 'crd')]
    elif name == 'cifar100_ablation_stages':
      # Every cell of the slides' stage table (tests/test_ablations.py checks the fields).
      variants = [(f'student_stage={i},teacher_stage={j}',
                   module.get_config(f'student_stage={i},teacher_stage={j}'))
                  for i in module.STAGES for j in module.STAGES]
    elif name == 'cifar100_ablation_components':
      variants = [(f'row={r}', module.get_config(f'row={r}')) for r in module.ARGS['row']]
    else:
      variants = [('', module.get_config())]
    for arg, config in variants:
      runs = config.runs.items() if 'runs' in config else [('', config)]
      for run_name, run in runs:
        yield ':'.join(p for p in (name, arg, run_name) if p), run


ALL = list(_all_configs())


def _parse(argv):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


# ------------------------------------------------------------------ the files


def test_every_paper_experiment_has_a_config():
  expected = {
      'cifar100_r56_r20', 'cifar100_r110_r32', 'cifar100_r32x4_r8x4',
      'cifar100_wrn40x2_wrn16x2', 'cifar100_wrn40x2_wrn40x1', 'cifar100_vgg13_vgg8',
      'cifar100_wrn40x2_shufflev1', 'cifar100_r32x4_shufflev1', 'cifar100_r32x4_shufflev2',
      'cifar100_r50_vgg8', 'cifar100_r50_mobilenetv2', 'cifar100_vgg13_mobilenetv2',
      'imagenet_r34_r18', 'imagenet_r50_mobilenet', 'cifar100_baseline', 'imagenet_baseline',
      'default', 'demo_digits', 'cifar100_table1'}
  assert expected <= set(CONFIG_FILES)
  # Each pair file is a row of the table, and each row has its file.
  pair_files = {n for n in CONFIG_FILES if n.startswith(('cifar100_', 'imagenet_'))
                and n not in PARAMETERISED}
  assert pair_files == {pathlib.Path(p.config_file).stem for p in pairs.TABLE}


@pytest.mark.parametrize('name', pairs.names())
def test_every_pair_file_loads_from_the_command_line_as_its_row(name):
  row = pairs.get(name)
  config = _parse(['main.py', f'--config={ROOT}/{row.config_file}'])
  assert config.to_dict() == pairs.reviewkd_config(name).to_dict()  # the parsed one is locked
  assert (config.teacher, config.model, config.method) == (row.teacher, row.student, 'reviewkd')
  assert config.dataset == row.dataset


@pytest.mark.parametrize('arg,model', [
    ('configs/cifar100_baseline.py:model=resnet56', 'resnet56'),
    ('configs/cifar100_baseline.py:model=MobileNetV2', 'MobileNetV2'),
    ('configs/imagenet_baseline.py:model=resnet18', 'resnet18'),
    ('configs/cifar100_table1.py:pair=vgg13_vgg8,method=crd', 'vgg8'),
    ('configs/cifar100_table1.py:method=kd,pair=r56_r20', 'resnet20'),
])
def test_parameterised_configs_load_from_the_command_line(arg, model):
  assert _parse(['main.py', f'--config={ROOT}/{arg}']).model == model


def test_a_bad_argument_on_the_command_line_names_the_form():
  # main.py sees the parser's ValueError wrapped in absl's IllegalFlagValueError.
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r'did you mean model=resnet56\?\)\. Write --config='
                           r'configs/cifar100_baseline.py:model=MODEL with MODEL one of'):
    _parse(['main.py', f'--config={ROOT}/configs/cifar100_baseline.py:resnet56'])


@pytest.mark.parametrize('name,config', ALL, ids=[n for n, _ in ALL])
def test_config_builds_its_networks(name, config):
  method = check_config(config)
  spec = data.get_spec(config.dataset)
  model, teacher = method.build(config, spec, jnp.float32)
  x = jnp.zeros((1, *spec.image_shape), jnp.float32)
  # One trace builds the variables and runs the forward (init_with_output): shapes only.
  out, _ = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0), x, train=False))
  assert out[0].shape == (1, spec.num_classes), name
  assert (teacher is not None) == (config.method != 'none')
  if not name.startswith('demo'):  # the paper's configs run on 8-device hosts as they are
    assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0


# ------------------------------------------------------------------ the pair table

# name -> (teacher, student, lambda, lr): the authors' settings.
CIFAR_PAIRS = {
    'r56_r20': ('resnet56', 'resnet20', 0.6, 0.1),
    'r110_r32': ('resnet110', 'resnet32', 1.0, 0.1),
    'r32x4_r8x4': ('resnet32x4', 'resnet8x4', 5.0, 0.1),
    'wrn40x2_wrn16x2': ('wrn_40_2', 'wrn_16_2', 5.0, 0.1),
    'wrn40x2_wrn40x1': ('wrn_40_2', 'wrn_40_1', 5.0, 0.1),
    'vgg13_vgg8': ('vgg13', 'vgg8', 5.0, 0.1),
    'wrn40x2_shufflev1': ('wrn_40_2', 'ShuffleV1', 5.0, 0.02),
    'r32x4_shufflev1': ('resnet32x4', 'ShuffleV1', 5.0, 0.02),
    'r32x4_shufflev2': ('resnet32x4', 'ShuffleV2', 8.0, 0.02),
    'r50_vgg8': ('ResNet50', 'vgg8', 5.0, 0.1),
    'r50_mobilenetv2': ('ResNet50', 'MobileNetV2', 5.0, 0.02),
    'vgg13_mobilenetv2': ('vgg13', 'MobileNetV2', 5.0, 0.02),
}
TABLE1 = ('r56_r20', 'r110_r32', 'r32x4_r8x4', 'wrn40x2_wrn16x2', 'wrn40x2_wrn40x1',
          'vgg13_vgg8')


def test_the_table_holds_each_pair_once():
  names = [p.name for p in pairs.TABLE]
  assert len(names) == len(set(names)) == 14
  networks = [(p.dataset, p.teacher, p.student) for p in pairs.TABLE]
  assert len(networks) == len(set(networks))
  assert set(names) == set(CIFAR_PAIRS) | {'r34_r18', 'r50_mobilenet'}
  assert pairs.names('Table 1') == cifar100_table1.PAIRS == TABLE1


@pytest.mark.parametrize('name', pairs.names())
def test_every_pair_resolves(name):
  row = pairs.get(name)
  assert {row.teacher, row.student} <= set(list_models())
  assert row.dataset in pairs.SCRIPT_FIELDS
  networks = (cifar100_baseline.LEARNING_RATES if row.dataset == pairs.CIFAR100 else
              imagenet_baseline.MODELS)
  assert {row.teacher, row.student} <= set(networks)
  assert {row.student_features, row.teacher_features} <= {'stages', 'preact'}
  assert row.reviewkd_weight > 0 and row.mid_channels >= 0 and row.note
  columns = {'teacher', 'student'} | set(cifar100_table1.METHODS)
  assert set(row.published) <= columns
  assert all(0 < v < 100 for v in row.published.values())
  assert bool(row.table) == bool(row.published)
  if row.table == 'Table 1':  # every column but DKD (which the paper predates), and DKD's beta
    assert set(row.published) == columns - {'dkd'} and row.dkd_beta > 0
  else:
    assert row.dkd_beta is None


def test_every_baseline_network_is_in_a_pair():
  cifar = {n for p in pairs.TABLE if p.dataset == pairs.CIFAR100 for n in (p.teacher, p.student)}
  imagenet = {n for p in pairs.TABLE if p.dataset == pairs.IMAGENET
              for n in (p.teacher, p.student)}
  assert cifar == set(cifar100_baseline.LEARNING_RATES)
  assert imagenet == set(imagenet_baseline.MODELS)
  assert {m for m, lr in cifar100_baseline.LEARNING_RATES.items() if lr != 0.1} == {
      'ShuffleV1', 'ShuffleV2', 'MobileNetV2'}


@pytest.mark.parametrize('name', list(CIFAR_PAIRS))
def test_cifar_pairs_use_the_authors_settings(name):
  teacher, student, lam, lr = CIFAR_PAIRS[name]
  config = _module(f'cifar100_{name}').get_config()
  assert (config.teacher, config.model) == (teacher, student)
  assert (config.reviewkd_weight, config.learning_rate) == (lam, lr)
  assert config.teacher_bn_mode == 'batch_stats' and config.reviewkd_warmup_epochs == 20
  assert (config.student_features, config.teacher_features) == ('stages', 'preact')
  assert config.mid_channels == 0
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


def test_published_numbers_and_dkd_betas():
  assert dict(pairs.get('r56_r20').published) == dict(
      teacher=72.34, student=69.06, kd=70.66, fitnet=69.21, pkt=70.34, rkd=69.61, crd=71.16,
      at=70.55, vid=70.38, ofd=70.98, reviewkd=71.89)
  assert [pairs.get(p).published['reviewkd'] for p in TABLE1] == [
      71.89, 73.89, 75.63, 76.12, 75.09, 74.84]
  assert [pairs.get(p).published['teacher'] for p in TABLE1] == [
      72.34, 74.31, 79.42, 75.61, 75.61, 74.64]
  assert [pairs.get(p).dkd_beta for p in TABLE1] == [2.0, 2.0, 8.0, 6.0, 6.0, 6.0]
  assert pairs.get('vgg13_vgg8').published['ofd'] == 73.95
  assert [pairs.get(p).published.get('reviewkd') for p in (
      'r32x4_shufflev1', 'r32x4_shufflev2', 'r50_mobilenetv2', 'wrn40x2_shufflev1')] == [
          77.45, 77.78, 69.89, None]
  # Paper Table 3 (top-1).
  assert dict(pairs.get('r34_r18').published) == dict(
      teacher=73.31, student=69.75, kd=70.66, at=70.69, ofd=70.81, crd=71.17, reviewkd=71.61)
  assert dict(pairs.get('r50_mobilenet').published) == dict(
      teacher=76.16, student=68.87, kd=68.58, at=69.56, ofd=71.25, crd=71.37, reviewkd=72.56)


def test_rows_are_read_only_and_unknown_pairs_list_the_names():
  row = pairs.get('r56_r20')
  with pytest.raises(dataclasses.FrozenInstanceError):
    row.reviewkd_weight = 1.0
  with pytest.raises(TypeError):
    row.published['reviewkd'] = 0.0
  with pytest.raises(ValueError, match="Unknown pair 'r20_r56'; configs/pairs.py has r56_r20, "
                                       r'r110_r32, .*, r50_mobilenet\.'):
    pairs.get('r20_r56')


def test_table1_columns_are_the_registered_methods():
  assert cifar100_table1.METHODS == tuple(m for m in list_methods() if m != 'none')
  for name in TABLE1:
    assert cifar100_table1.get_config(f'pair={name},method=reviewkd') == (
        pairs.reviewkd_config(name))
    assert cifar100_table1.get_config(f'pair={name},method=dkd').dkd_beta == (
        pairs.get(name).dkd_beta)


# ------------------------------------------------------------------ the argument parser

ALLOWED = {'pair': ('r56_r20', 'vgg13_vgg8'), 'method': ('kd', 'crd')}
USAGE = ('Write --config=configs/x.py:pair=PAIR,method=METHOD with PAIR one of r56_r20, '
         'vgg13_vgg8 and METHOD one of kd, crd.')


@pytest.mark.parametrize('arg', ['pair=r56_r20,method=crd', 'method=crd,pair=r56_r20',
                                 ' pair = r56_r20 , method = crd '])
def test_parse_reads_key_value_pairs(arg):
  assert args.parse(arg, ALLOWED, 'configs/x.py') == {'pair': 'r56_r20', 'method': 'crd'}


@pytest.mark.parametrize('arg,problem', [
    (None, 'needs an argument after the file name'),
    ('', 'needs an argument after the file name'),
    ('r56_r20,crd', "'r56_r20' in 'r56_r20,crd' is not key=value"),
    ('pair=r56_r20,methods=crd', "unknown key 'methods' in 'pair=r56_r20,methods=crd'"),
    ('pair=r56_r20,pair=r56_r20', "pair given twice in 'pair=r56_r20,pair=r56_r20'"),
    ('pair=r56_r20', "method missing in 'pair=r56_r20'"),
    ('pair=r56_r20,method=', "unknown method '' in 'pair=r56_r20,method='"),
    ('pair=r20_r56,method=crd', "unknown pair 'r20_r56' in 'pair=r20_r56,method=crd'"),
    ('pair=r56_r20,method=CRD', "unknown method 'CRD' in 'pair=r56_r20,method=CRD'"),
])
def test_parse_says_what_is_wrong_and_the_form(arg, problem):
  with pytest.raises(ValueError) as e:
    args.parse(arg, ALLOWED, 'configs/x.py')
  assert str(e.value) == f'configs/x.py: {problem}. {USAGE}'


def test_parse_hints_the_key_for_the_old_style():
  with pytest.raises(ValueError, match=r"'resnet56' in 'resnet56' is not key=value \(did you "
                                       r'mean model=resnet56\?\)'):
    args.parse('resnet56', {'model': ('resnet20', 'resnet56')}, 'configs/x.py')
  with pytest.raises(ValueError, match=r"'resnet57' in 'resnet57' is not key=value\. Write"):
    args.parse('resnet57', {'model': ('resnet20', 'resnet56')}, 'configs/x.py')


@pytest.mark.parametrize('module,arg,match', [
    (cifar100_baseline, None, 'configs/cifar100_baseline.py: needs an argument after the file '
     'name. Write --config=configs/cifar100_baseline.py:model=MODEL with MODEL one of '
     'resnet56, resnet110, .*, MobileNetV2.'),
    (cifar100_baseline, 'resnet56', r'did you mean model=resnet56\?'),
    (cifar100_baseline, 'model=resnet57', "unknown model 'resnet57'"),
    (imagenet_baseline, 'model=resnet20', "unknown model 'resnet20' in 'model=resnet20'. "
     'Write --config=configs/imagenet_baseline.py:model=MODEL with MODEL one of resnet18, '
     r'mobilenet_v1, resnet34, resnet50\.'),
    (cifar100_table1, 'pair=r56_r20,method=none', "unknown method 'none'"),
    (cifar100_table1, 'pair=r56_r20,method=fitnets', 'Write --config=configs/cifar100_table1.py:'
     'pair=PAIR,method=METHOD with PAIR one of r56_r20, r110_r32, r32x4_r8x4, wrn40x2_wrn16x2, '
     'wrn40x2_wrn40x1, vgg13_vgg8 and METHOD one of at, crd, dkd, fitnet, kd, ofd, pkt, '
     r'reviewkd, rkd, vid\.'),
    (cifar100_table1, 'pair=r50_vgg8,method=kd', "unknown pair 'r50_vgg8'"),  # not Table 1
])
def test_parameterised_configs_reject_bad_arguments(module, arg, match):
  with pytest.raises(ValueError, match=match):
    module.get_config(arg)


# ------------------------------------------------------------------ overrides and checks


def test_command_line_overrides_and_typos():
  config = _parse(['main.py', f'--config={ROOT}/configs/cifar100_baseline.py:model=resnet56',
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


def test_demo_suite_compares_seeded_groups_against_a_teacher_that_knows_more():
  config = importlib.import_module('configs.demo_digits').get_config()
  assert config.run_order[0] == 'teacher'
  assert config.runs.teacher.train_subset == 0  # the whole training split
  groups = {name: [config.runs[r] for r in runs] for name, runs in config.groups.items()}
  assert set(config.compare) == set(groups)
  for runs in groups.values():
    assert len({r.seed for r in runs}) == len(runs) >= 3
    assert {r.train_subset for r in runs} == {100}
  assert {r.method for r in groups['student + ReviewKD']} == {'reviewkd'}
  assert all(name in config.run_order for runs in config.groups.values() for name in runs)
