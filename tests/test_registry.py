"""Registry behaviour, and a guard that every registered model has a parity test."""
import importlib

import pytest

from reviewkd_jax import models

PARITY_TEST_MODULES = ['tests.test_models_cifar_resnet_wrn_vgg',
                       'tests.test_models_cifar_shufflenet_mobilenetv2',
                       'tests.test_models_imagenet']


def test_unknown_model_lists_known_names():
  with pytest.raises(ValueError) as e:
    models.create_model('resnet9000')
  assert 'resnet20' in str(e.value) and 'resnet18' in str(e.value)


def test_case_hint_for_near_miss():
  with pytest.raises(ValueError, match="Did you mean 'MobileNetV2'"):
    models.create_model('mobilenetv2')


def test_every_registered_model_has_a_parity_test():
  covered = set()
  for name in PARITY_TEST_MODULES:
    covered |= set(importlib.import_module(name).COVERED_MODELS)
  missing = set(models.list_models()) - covered
  assert not missing, f'registered models without a PyTorch parity test: {sorted(missing)}'


def test_paper_model_names_are_registered():
  names = set(models.list_models())
  paper = {'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
           'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'vgg8',
           'vgg11', 'vgg13', 'vgg16', 'vgg19', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2',
           'ResNet50', 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'mobilenet_v1'}
  assert paper <= names, sorted(paper - names)


def test_every_registered_model_has_a_pytorch_reference_with_equal_parameter_count():
  torch_reference = pytest.importorskip('reviewkd_jax.testing')
  import jax
  import jax.numpy as jnp
  import numpy as np
  for name in models.list_models():
    t_model, _ = torch_reference.build(name, num_classes=10)
    flax_model = models.create_model(name, num_classes=10)
    size = 64 if name in ('resnet18', 'resnet34', 'resnet50', 'resnet101') else 32
    if name == 'mobilenet_v1':
      size = 224
    shapes = jax.eval_shape(lambda: flax_model.init(jax.random.key(0),
                                                    jnp.zeros((1, size, size, 3)), train=False))
    n_flax = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes['params']))
    assert n_flax == sum(p.numel() for p in t_model.parameters()), name
