"""CRD's CIFAR MobileNetV2, ShuffleV1 and ShuffleV2: shapes, sizes, PyTorch parity, init,
feature conventions and train mode."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import torch_utils  # skips this module when PyTorch is missing
from reviewkd_jax.testing.torch_cifar_shufflenet_mobilenetv2 import REFERENCES
from reviewkd_jax.testing.torch_cifar_shufflenet_mobilenetv2 import shuffle as torch_shuffle
from reviewkd_jax import convert
from reviewkd_jax.models import create_model, list_models
from reviewkd_jax.models.shufflenetv1 import channel_shuffle
from tests.helpers import LLVM_LEVEL_1

COVERED_MODELS = ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']

# Per model at 32x32 input: parameters with 100 classes (the CRD references'), stem and stage
# (H, W, C), pooled width.
SPECS = {
    'MobileNetV2': dict(params=812_836, stem=(16, 16, 16),
                        stages=[(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], pooled=1280),
    'ShuffleV1': dict(params=949_258, stem=(32, 32, 24),
                      stages=[(16, 16, 240), (8, 8, 480), (4, 4, 960)], pooled=960),
    'ShuffleV2': dict(params=1_355_528, stem=(32, 32, 24),
                      stages=[(16, 16, 116), (8, 8, 232), (4, 4, 464)], pooled=1024),
}
BATCH = 2


def _init_shapes(model, dtype=jnp.float32):
  x = jnp.zeros((BATCH, 32, 32, 3), dtype)
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))


@functools.cache
def _train_step(name: str):
  """Returns (initial variables, train-mode (logits, features), updated batch_stats)."""
  model = create_model(name)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  # At LLVM level 1, not the suite's 0 (tests/conftest.py): test_feature_conventions checks
  # outputs equal to the bit that level 0 computes in two ways (ShuffleV2's stages).
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                  compiler_options=LLVM_LEVEL_1)
  out, updates = train(variables, x)
  return variables, out, updates['batch_stats']


def test_all_covered_models_are_registered():
  assert set(COVERED_MODELS) <= set(list_models())
  assert set(COVERED_MODELS) == set(SPECS) == set(REFERENCES)


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_output_shapes(name):
  spec = SPECS[name]
  (logits, feats), _ = _init_shapes(create_model(name, num_classes=10))
  assert logits.shape == (BATCH, 10)
  assert feats['stem'].shape == (BATCH, *spec['stem'])
  assert [f.shape for f in feats['stages']] == [(BATCH, *s) for s in spec['stages']]
  assert [f.shape for f in feats['preact']] == [(BATCH, *s) for s in spec['stages']]
  assert feats['pooled'].shape == (BATCH, spec['pooled'])


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_bfloat16_computes_in_bfloat16_with_float32_params(name):
  (logits, feats), variables = _init_shapes(create_model(name, dtype=jnp.bfloat16),
                                            jnp.bfloat16)
  outs = [logits, feats['stem'], feats['pooled'], *feats['stages'], *feats['preact']]
  assert {o.dtype for o in outs} == {jnp.dtype(jnp.bfloat16)}
  assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_param_count_matches_reference(name):
  n_torch = sum(p.numel() for p in REFERENCES[name](num_classes=100).parameters())
  n_flax = torch_utils.param_count(create_model(name, num_classes=100))
  assert n_flax == n_torch == SPECS[name]['params']


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_parity_with_pytorch_reference(name):
  worst = torch_utils.run_parity(create_model(name), REFERENCES[name](num_classes=100),
                                 lambda m, x: m(x), input_shape=(BATCH, 32, 32, 3))
  print(f'{name}: worst abs diff {worst:.2e}')


@pytest.mark.parametrize('groups', [2, 3, 4])
def test_channel_shuffle_matches_nchw_definition(groups):
  x = np.random.default_rng(groups).standard_normal((2, 3, 5, 12)).astype(np.float32)
  want = torch_shuffle(torch_utils.torch.from_numpy(x.transpose(0, 3, 1, 2)), groups)
  got = channel_shuffle(jnp.asarray(x), groups)
  np.testing.assert_array_equal(np.asarray(got), torch_utils.nchw_to_nhwc(want))
  assert not np.array_equal(np.asarray(got), x)  # a real permutation, not the identity


def _kurtosis(a: np.ndarray) -> float:
  a = a.astype(np.float64) - a.mean()
  return float(np.mean(a**4) / np.mean(a**2)**2)


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_init_matches_reference(name):
  """Each parameter's init distribution (constant, or scale and shape) matches the reference's."""
  variables, _, _ = _train_step(name)
  ours = convert.flax_to_torch({'params': variables['params']})
  torch_utils.torch.manual_seed(0)
  theirs = dict(REFERENCES[name](num_classes=100).named_parameters())
  assert set(ours) == set(theirs)
  for key, t in theirs.items():
    t, f = t.detach().numpy().ravel(), np.asarray(ours[key]).ravel()
    if t.min() == t.max():  # BatchNorm ones/zeros, zero biases
      np.testing.assert_array_equal(f, t, err_msg=key)
    elif t.size >= 2000:  # enough samples to compare spread and tails
      assert f.std() == pytest.approx(t.std(), rel=0.15), key
      # Kurtosis tells uniform (1.8) from normal (3.0); its sampling error here is < 0.11.
      assert _kurtosis(f) == pytest.approx(_kurtosis(t), abs=0.5), key


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_train_mode_updates_batch_stats(name):
  variables, (logits, _), new_stats = _train_step(name)
  old = traverse_util.flatten_dict(variables['batch_stats'])
  new = traverse_util.flatten_dict(new_stats)
  assert old.keys() == new.keys()
  for path in old:
    assert np.all(np.isfinite(new[path])), path
  # A BatchNorm fed by another (through a linear conv) sees an exactly zero batch mean, so
  # a layer counts as updated when its mean or its variance moved.
  for mod in {path[:-1] for path in old}:
    moved = [not np.allclose(old[(*mod, s)], new[(*mod, s)]) for s in ('mean', 'var')]
    assert any(moved), f'{"/".join(mod)} was not updated'
  assert np.all(np.isfinite(logits))


def _check_shufflev1(feats):
  # ShuffleV1 stages are relu of the last block's residual sum.
  for stage, pre in zip(feats['stages'], feats['preact']):
    np.testing.assert_array_equal(stage, jax.nn.relu(pre))
  np.testing.assert_allclose(feats['pooled'], feats['stages'][-1].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)


def _check_shufflev2(feats):
  # CRD's ShuffleV2 preact is concat([x1, branch]) before the stage's last channel shuffle.
  for stage, pre in zip(feats['stages'], feats['preact']):
    np.testing.assert_array_equal(stage, channel_shuffle(jax.nn.relu(pre), 2))
    assert not np.array_equal(stage, jax.nn.relu(pre))


def _check_mobilenetv2(feats):
  # Blocks end in a linear projection: no activation, so preact is the stage itself.
  for stage, pre in zip(feats['stages'], feats['preact']):
    np.testing.assert_array_equal(stage, pre)


CONVENTION_CHECKS = {'ShuffleV1': _check_shufflev1, 'ShuffleV2': _check_shufflev2,
                     'MobileNetV2': _check_mobilenetv2}


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_feature_conventions(name):
  _, (_, feats), _ = _train_step(name)
  assert feats['stem'].min() >= 0  # the stem is returned after its ReLU
  for pre in feats['preact']:
    assert pre.min() < 0  # the pre-activation is really taken before a ReLU
  CONVENTION_CHECKS[name](feats)
