"""Shared test settings: the repository root, the mock-data size and the tiny training config."""
import os
import pathlib

import jax

from configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every mock split (tfds.testing.mock_data): 3 training steps of 16, 4 eval batches (8 padded).
NUM_MOCK_EXAMPLES = 56
ONE_DEVICE = jax.devices()[:1]
# Per-program compiler option for the few checks that depend on how LLVM rounds: the suite
# compiles at level 0 (tests/conftest.py), these programs at level 1.
LLVM_LEVEL_1 = {'xla_backend_optimization_level': 1}


def xdist_share_of_cores() -> int:
  """Returns this process's share of the machine's cores under pytest-xdist (all of them
  outside it): each worker's fair number of compute threads."""
  workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
  return max(1, len(os.sched_getaffinity(0)) // workers)


def xla_flags(devices: int) -> str:
  """Returns this run's XLA_FLAGS (tests/conftest.py) with `devices` simulated CPU devices, for
  a subprocess that needs another device count."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}'])


def snapshot(root: pathlib.Path) -> dict:
  """Returns {path: (size, mtime)} of everything under `root` ({} if it does not exist)."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob('*')} if root.exists() else {}


def tiny_config(**fields):
  """Returns a 2-epoch CIFAR-100 resnet8 run on the mock split, logging every step."""
  config = default.get_config()
  config.update(dataset='cifar100', model='resnet8', batch_size=16, eval_batch_size=16,
                num_epochs=2, learning_rate=0.05, base_batch_size=16, lr_decay_epochs=(1,),
                log_every_steps=1, keep_checkpoints=2, prefetch_batches=1)
  config.update(fields)
  return config


def draw_variables(template, seed: int = 0) -> dict:
  """Returns variables shaped like `template` (e.g. `model.abstract_variables(module)`), drawn
  with numpy, so a test needs no compiled `init`: kernels at He scale (prediction layers,
  module paths with 'rpn' or 'predictor', at 0.01 as Detectron2 initialises them), biases and
  BatchNorm shifts ~N(0, 0.1), scales and variances in [0.75, 1.25]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if len(x.shape) > 1:
      std = 0.01 if ('rpn' in name or 'predictor' in name) else np.sqrt(
          2.0 / np.prod(x.shape[:-1]))
      return rng.normal(0, std, x.shape).astype(np.float32)
    if 'var' in name or 'scale' in name:
      return rng.uniform(0.75, 1.25, x.shape).astype(np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, template)
