"""Shared test settings: the repository root, the mock-data size and the tiny training config."""
import pathlib

import jax

from configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every mock split (tfds.testing.mock_data): 3 training steps of 16, 4 eval batches (8 padded).
NUM_MOCK_EXAMPLES = 56
ONE_DEVICE = jax.devices()[:1]


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
