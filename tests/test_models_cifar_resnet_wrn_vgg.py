"""CRD's CIFAR ResNet, WRN, VGG(-BN) and ResNet50: shapes, sizes, PyTorch parity, features."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_utils  # skips the module when PyTorch is missing
from reviewkd_jax.testing import torch_cifar_resnet_wrn_vgg as ref
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


PARITY_SEED = 0


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_parity_with_pytorch(name):
  worst = torch_utils.run_parity(create_model(name), ref.build(name), ref.forward,
                                 input_shape=(BATCH, 32, 32, 3), seed=PARITY_SEED, atol=1e-4)
  print(f'{name}: worst |flax - torch| = {worst:.2e}')


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_1', 'vgg8', 'ResNet50'])
def test_dtype_sets_computation_not_params(name):
  model = create_model(name, dtype=jnp.bfloat16)
  (logits, feats), variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), _x(), train=False))
  outputs = [logits, feats['stem'], feats['pooled'], *feats['stages'], *feats['preact']]
  assert {o.dtype for o in outputs} == {jnp.dtype(jnp.bfloat16)}
  assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


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


# ResNet50 runs the same CifarResNet code as resnet8 (and parity pins its preact).
@pytest.mark.parametrize('name', ['resnet8', 'vgg8'])
def test_stages_are_relu_of_preact(name):
  _, variables, (logits, feats) = _converted(name)
  for pre, post in zip(feats['preact'], feats['stages']):
    assert float(jnp.min(pre)) < 0  # really before the ReLU
    _close(post, jax.nn.relu(pre))
  _close(feats['pooled'], jnp.mean(feats['stages'][-1], axis=(1, 2)))
  head = variables['params']['classifier' if name == 'vgg8' else 'fc']
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
  model, variables, (eval_logits, _) = _converted(name)
  (logits, _), updates = model.apply(variables, _x(), train=True, mutable=['batch_stats'])
  assert logits.shape == (BATCH, 100) and np.isfinite(np.asarray(logits)).all()
  old = jax.tree_util.tree_leaves(variables['batch_stats'])
  new = jax.tree_util.tree_leaves(updates['batch_stats'])
  assert len(old) == len(new)
  assert all(not np.allclose(a, b) for a, b in zip(old, new))
  # Train mode normalises with batch statistics, so it differs from eval mode.
  assert not np.allclose(logits, eval_logits, atol=1e-3)


def _dense_and_conv_layers(name):
  """Returns {module path: module} for every Conv/Dense the model builds (abstract init only)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Conv, nn.Dense)):
      found['/'.join(context.module.path)] = context.module
    return next_fun(*args, **kwargs)

  model = create_model(name)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), _x(), train=False))
  return found


def test_initializers_match_crd():
  """The layers carry each reference's initialisers (drawing full models is slow on CPU)."""
  key = jax.random.key(0)
  # Every initialiser is drawn at these shapes: one RNG compilation per distribution.
  conv_shape, dense_shape = (3, 3, 16, 64), (64, 100)
  fan_out_std = np.sqrt(2.0 / (3 * 3 * 64))  # kaiming_normal_(mode='fan_out')
  torch_bound = 1 / np.sqrt(64)  # PyTorch's default Linear init U(+-1/sqrt(fan_in))

  def std(init, shape):
    return float(jnp.std(init(key, shape)))

  vgg = _dense_and_conv_layers('vgg8')
  # CRD's VGG._initialize_weights: conv N(0, sqrt(2 / (k * k * out))) with zero bias,
  # Linear N(0, 0.01) with zero bias.
  assert vgg['block4_0'].use_bias and not np.any(vgg['block4_0'].bias_init(key, (100,)))
  assert abs(std(vgg['block4_0'].kernel_init, conv_shape) / fan_out_std - 1) < 0.03
  assert abs(std(vgg['classifier'].kernel_init, dense_shape) / 0.01 - 1) < 0.03
  assert not np.any(vgg['classifier'].bias_init(key, (100,)))
  wrn = _dense_and_conv_layers('wrn_16_1')
  assert abs(std(wrn['block2/layer_0/conv1'].kernel_init, conv_shape) / fan_out_std - 1) < 0.03
  assert not np.any(wrn['fc'].bias_init(key, (100,)))  # CRD zeroes the WRN Linear bias
  fc_kernel = wrn['fc'].kernel_init(key, dense_shape)
  assert float(jnp.max(jnp.abs(fc_kernel))) <= torch_bound
  assert abs(float(jnp.std(fc_kernel)) / (torch_bound / np.sqrt(3)) - 1) < 0.03
  res = _dense_and_conv_layers('resnet8')
  for path in ('conv1', 'layer2_0/conv1', 'layer2_0/downsample_0'):
    assert abs(std(res[path].kernel_init, conv_shape) / fan_out_std - 1) < 0.03, path
  bias = res['fc'].bias_init(key, (100,))  # CRD's resnet keeps PyTorch's default Linear bias
  assert np.any(bias) and float(jnp.max(jnp.abs(bias))) <= torch_bound
