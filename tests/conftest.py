"""Test setup: 8 simulated CPU devices, no GPU, no network; shared fixtures.

The repository root is on `sys.path` through pytest's `pythonpath` setting (pyproject.toml),
so tests import `configs`, `tests.helpers` and `tests.torch_utils` directly.
"""
import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # noqa: E402


@pytest.fixture(scope='module')
def mock_cifar100():
  """tfds's mock data for the module's tests: every split has `NUM_MOCK_EXAMPLES` examples."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tests.helpers import NUM_MOCK_EXAMPLES  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    yield
