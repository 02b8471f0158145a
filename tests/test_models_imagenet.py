"""ImageNet backbones: parity with torchvision / the authors' MobileNet, 224 px shapes, counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import convert
from reviewkd_jax.models import create_model
from reviewkd_jax.testing import torch_imagenet as ref
from tests.torch_utils import param_count, randomize, run_parity, torch, torchvision

COVERED_MODELS = ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'mobilenet_v1']

# Published torchvision counts at 1000 classes (also checked against the torch models below).
TORCHVISION_PARAMS = {'resnet18': 11_689_512, 'resnet34': 21_797_672,
                      'resnet50': 25_557_032, 'resnet101': 44_549_160}

# name -> (stem, stages) as (channels, pixels) at 224 px.
SHAPES_224 = {
    'resnet18': ((64, 56), [(64, 56), (128, 28), (256, 14), (512, 7)]),
    'resnet34': ((64, 56), [(64, 56), (128, 28), (256, 14), (512, 7)]),
    'resnet50': ((64, 56), [(256, 56), (512, 28), (1024, 14), (2048, 7)]),
    'resnet101': ((64, 56), [(256, 56), (512, 28), (1024, 14), (2048, 7)]),
    'mobilenet_v1': ((32, 112), [(128, 56), (256, 28), (512, 14), (1024, 7)]),
}


def torch_reference(name):
  """Returns (torch model, forward returning our features layout) for `name`."""
  if name == 'mobilenet_v1':
    return ref.AuthorsMobileNet(), ref.mobilenet_forward
  return getattr(torchvision().models, name)(), ref.resnet_forward


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_parity_with_torch(name):
  tmodel, forward = torch_reference(name)
  # The authors' MobileNet ends in AvgPool2d(7), so it only runs at 224 px; one image is cheap.
  shape = (1, 224, 224, 3) if name == 'mobilenet_v1' else (1 if name == 'resnet101' else 2,
                                                           64, 64, 3)
  worst = run_parity(create_model(name, num_classes=1000), tmodel, forward, input_shape=shape)
  print(f'{name}: worst abs diff {worst:.2e}')


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_feature_shapes_at_224(name):
  model = create_model(name, num_classes=1000)
  (logits, feats), _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  (stem_c, stem_px), stages = SHAPES_224[name]
  assert feats['stem'].shape == (2, stem_px, stem_px, stem_c)
  assert [f.shape for f in feats['stages']] == [(2, p, p, c) for c, p in stages]
  assert [f.shape for f in feats['preact']] == [(2, p, p, c) for c, p in stages]
  assert feats['pooled'].shape == (2, stages[-1][0])
  assert logits.shape == (2, 1000)


@pytest.mark.parametrize('name', COVERED_MODELS)
def test_param_count_matches_torch(name):
  model, _ = torch_reference(name)
  torch_count = sum(p.numel() for p in model.parameters())
  assert param_count(create_model(name, num_classes=1000)) == torch_count
  if name in TORCHVISION_PARAMS:
    assert torch_count == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v1'])
def test_compute_dtype_keeps_float32_params(name):
  model = create_model(name, num_classes=10, dtype=jnp.bfloat16)
  (logits, feats), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in jax.tree_util.tree_leaves(feats))


def test_train_mode_matches_torch_and_updates_batch_stats():
  """Train mode normalises with batch statistics and moves running stats like PyTorch."""
  tmodel = randomize(torchvision().models.resnet18(), seed=1)
  model = create_model('resnet18', num_classes=1000)
  x = np.random.default_rng(1).standard_normal((4, 64, 64, 3)).astype(np.float32)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(x), train=False))
  variables = convert.torch_to_flax(tmodel.state_dict(), template)
  (logits, _), updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  with torch.no_grad():
    t_logits = tmodel.train()(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-4)
  new_stats = convert.flax_to_torch(updates)
  old_stats = convert.flax_to_torch(variables)
  state = tmodel.state_dict()
  assert len(new_stats) == 2 * 20  # mean and var of every BatchNorm of ResNet-18
  for key, value in new_stats.items():
    assert np.abs(value - old_stats[key]).max() > 1e-3, f'{key} did not move'
    np.testing.assert_allclose(value, state[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=key)


def test_init_matches_torch_schemes():
  """torchvision: kaiming_normal fan_out convs; the authors' MobileNet: PyTorch defaults."""
  def init_params(name):
    model = create_model(name, num_classes=1000)
    # Drawing ~10M numbers dominates; the 'rbg' generator does it ~2x faster than threefry.
    key = jax.random.key(0, impl='rbg')
    init = jax.jit(lambda k, x: model.init(k, x, train=False))
    return init(key, jnp.zeros((1, 32, 32, 3)))['params']

  params = init_params('resnet18')
  kernel = np.asarray(params['layer4_1']['conv2']['kernel'])  # fan_out = 9 * 512
  assert abs(kernel.std() / np.sqrt(2 / (9 * 512)) - 1) < 0.02
  assert np.all(np.asarray(params['layer4_1']['bn2']['scale']) == 1)
  assert np.all(np.asarray(params['layer4_1']['bn2']['bias']) == 0)
  assert np.abs(np.asarray(params['fc']['kernel'])).max() <= 1 / np.sqrt(512)

  params = init_params('mobilenet_v1')
  for module, fan_in in (('model_13_0', 9), ('model_13_3', 1024)):  # depthwise, pointwise
    kernel = np.asarray(params[module]['kernel'])
    bound = 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
    assert np.abs(kernel).max() <= bound
    assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 0.05, module
