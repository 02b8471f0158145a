"""CRD's CIFAR ResNet, WRN, VGG(-BN) and ResNet50: shapes, sizes, PyTorch parity, features."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_utils  # skips the module when PyTorch is missing
import torch_ref_cifar_a as ref
from reviewkd_jax import convert
from reviewkd_jax.models import create_model
from reviewkd_jax.models.cifar_resnet import BASIC, ResidualBlock

# Published parameter counts with 100 classes (CRD / ReviewKD model zoo sizes).
PUBLISHED_PARAMS = {
    'resnet20': 278_324, 'resnet56': 861_620, 'resnet110': 1_736_564,
    'resnet8x4': 1_233_540, 'resnet32x4': 7_433_860, 'wrn_40_2': 2_255_156,
    'wrn_16_2': 703_284, 'wrn_40_1': 569_780, 'vgg8': 3_965_028, 'vgg13': 9_462_180,
    'ResNet50': 23_705_252,
}

# (stem (H, C), stages [(H, C), ...]) on 32x32 inputs; preact has the stages' shapes and
# pooled the last stage's channels.
_RESNET = ((32, 16), ((32, 16), (16, 32), (8, 64)))
_RESNET_X4 = ((32, 32), ((32, 64), (16, 128), (8, 256)))
_VGG = ((32, 64), ((16, 128), (8, 256), (4, 512), (4, 512)))


def _wrn(k):
  return (32, 16), ((32, 16 * k), (16, 32 * k), (8, 64 * k))


EXPECTED_SHAPES = {
    **{f'resnet{d}': _RESNET for d in (8, 14, 20, 32, 44, 56, 110)},
    'resnet8x4': _RESNET_X4, 'resnet32x4': _RESNET_X4,
    'wrn_16_1': _wrn(1), 'wrn_16_2': _wrn(2), 'wrn_40_1': _wrn(1), 'wrn_40_2': _wrn(2),
    **{name: _VGG for name in ('vgg8', 'vgg11', 'vgg13', 'vgg16', 'vgg19')},
    'ResNet50': ((32, 64), ((32, 256), (16, 512), (8, 1024), (4, 2048))),
}

COVERED_MODELS = sorted(EXPECTED_SHAPES)
BATCH = 2


def _x(size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((BATCH, size, size, 3)),
                     jnp.float32)


def test_every_reference_is_covered():
  assert sorted(ref.BUILDERS) == COVERED_MODELS


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_shapes_and_parameter_count(name):
  model = create_model(name, num_classes=100)
  (logits, feats), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), _x(), train=False))
  (stem_h, stem_c), stages = EXPECTED_SHAPES[name]
  assert logits.shape == (BATCH, 100)
  assert feats['stem'].shape == (BATCH, stem_h, stem_h, stem_c)
  want = [(BATCH, h, h, c) for h, c in stages]
  assert [f.shape for f in feats['stages']] == want
  assert [f.shape for f in feats['preact']] == want
  assert feats['pooled'].shape == (BATCH, stages[-1][1])
  n_flax = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables['params']))
  n_torch = sum(p.numel() for p in ref.build(name).parameters())
  assert n_flax == n_torch
  if name in PUBLISHED_PARAMS:
    assert n_flax == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_parity_with_pytorch(name):
  worst = torch_utils.run_parity(create_model(name), ref.build(name), ref.forward,
                                 input_shape=(BATCH, 32, 32, 3))
  print(f'{name}: worst |flax - torch| = {worst:.2e}')


@functools.cache
def _converted(name, size=32):
  """Returns (model, variables converted from the randomised reference, outputs on `_x`)."""
  model = create_model(name)
  torch_model = torch_utils.randomize(ref.build(name), seed=1)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), _x(size), train=False))
  variables = convert.torch_to_flax(torch_model.state_dict(), template)
  # Eager apply: cheaper than compiling these models once more for a single call.
  return model, variables, model.apply(variables, _x(size), train=False)


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def _bn(variables, path, x):
  """Returns the eval-mode BatchNorm stored at module `path` applied to `x`."""
  p = functools.reduce(lambda d, k: d[k], path, variables['params'])
  s = functools.reduce(lambda d, k: d[k], path, variables['batch_stats'])
  return (x - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']


@pytest.mark.parametrize('name', ['resnet8', 'vgg8', 'ResNet50'])
def test_stages_are_relu_of_preact(name):
  _, variables, (logits, feats) = _converted(name)
  for pre, post in zip(feats['preact'], feats['stages']):
    assert float(jnp.min(pre)) < 0  # really before the ReLU
    _close(post, jax.nn.relu(pre))
  _close(feats['pooled'], jnp.mean(feats['stages'][-1], axis=(1, 2)))
  head = variables['params']['linear' if name == 'ResNet50' else
                             'classifier' if name == 'vgg8' else 'fc']
  _close(logits, feats['pooled'] @ head['kernel'] + head['bias'], atol=1e-4)
  assert float(jnp.min(feats['stem'])) >= 0  # stem is after its ReLU


def test_resnet_preact_is_last_residual_sum():
  _, variables, (_, feats) = _converted('resnet8')
  # resnet8 has one block per stage: stage 2's preact is its block's sum on stage 1's output.
  sum2 = ResidualBlock(32, BASIC, stride=2).apply(
      {k: v['layer2_0'] for k, v in variables.items()}, feats['stages'][0], train=False)
  _close(feats['preact'][1], sum2)


def test_wrn_features_follow_crd():
  _, variables, (logits, feats) = _converted('wrn_16_2')
  stages, preact = feats['stages'], feats['preact']
  # preact = the next stage's first bn1 (last: the final bn1) applied to the raw stage output.
  _close(preact[0], _bn(variables, ('block2', 'layer_0', 'bn1'), stages[0]))
  _close(preact[1], _bn(variables, ('block3', 'layer_0', 'bn1'), stages[1]))
  _close(preact[2], _bn(variables, ('bn1',), stages[2]))
  # Stages are raw residual sums (no ReLU) and the stem is the bare conv output.
  assert all(float(jnp.min(s)) < 0 for s in stages)
  assert float(jnp.min(feats['stem'])) < 0
  _close(feats['pooled'], jnp.mean(jax.nn.relu(preact[2]), axis=(1, 2)))
  fc = variables['params']['fc']
  _close(logits, feats['pooled'] @ fc['kernel'] + fc['bias'], atol=1e-4)


def test_vgg_pools_before_block4_only_at_64px():
  model = create_model('vgg8')
  _, feats = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), _x(64), train=False))[0]
  assert [f.shape[1] for f in feats['stages']] == [32, 16, 8, 4]
  _, feats = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), _x(32), train=False))[0]
  assert [f.shape[1] for f in feats['stages']] == [16, 8, 4, 4]


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_1', 'vgg8'])
def test_train_mode_updates_batch_stats(name):
  model = create_model(name)
  variables = model.init(jax.random.key(0), _x(), train=False)
  (logits, feats), updates = model.apply(variables, _x(seed=1), train=True,
                                         mutable=['batch_stats'])
  assert logits.shape == (BATCH, 100) and np.isfinite(np.asarray(logits)).all()
  old = jax.tree_util.tree_leaves(variables['batch_stats'])
  new = jax.tree_util.tree_leaves(updates['batch_stats'])
  assert len(old) == len(new)
  assert all(not np.allclose(a, b) for a, b in zip(old, new))
  # Train mode normalises with batch statistics, so it differs from eval mode.
  eval_logits, _ = model.apply(variables, _x(seed=1), train=False)
  assert not np.allclose(logits, eval_logits)


def test_init_matches_crd():
  """Initial weights follow each reference's scheme (fan_out convs, CRD's Linear inits)."""
  def params(name):
    return create_model(name).init(jax.random.key(0), _x(), train=False)['params']

  vgg = params('vgg8')
  assert abs(float(jnp.std(vgg['classifier']['kernel'])) - 0.01) < 1e-3
  assert not np.any(vgg['classifier']['bias']) and not np.any(vgg['block4_0']['bias'])
  # normal(0, sqrt(2 / (k * k * out_channels))): kaiming_normal fan_out.
  want = np.sqrt(2.0 / (9 * 512))
  assert abs(float(jnp.std(vgg['block4_0']['kernel'])) / want - 1) < 0.02
  wrn = params('wrn_16_1')
  assert not np.any(wrn['fc']['bias'])
  bound = 1 / np.sqrt(64)  # PyTorch's default Linear weight init U(+-1/sqrt(fan_in))
  assert float(jnp.max(jnp.abs(wrn['fc']['kernel']))) <= bound
  res = params('resnet8')
  assert np.any(res['fc']['bias'])  # CRD's resnet keeps PyTorch's default Linear bias
  assert float(jnp.max(jnp.abs(res['fc']['bias']))) <= bound
  assert float(jnp.mean(res['layer1_0']['bn1']['scale'])) == 1.0
