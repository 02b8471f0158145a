"""What every input pipeline derives the same way: a process's share of a split, seeds and the
tfds data folder.

Both the classification pipelines (`data/`) and the detection pipelines (`detection/data.py`)
take these from here, so that a run split over processes reads the same shares and draws the
same random numbers whichever task it is.
"""
import os

import numpy as np


def process_share(n: int, process_index: int, process_count: int) -> slice:
  """Returns this process's contiguous share of `n` items, rounded as `tfds.even_splits`:
  the first `n % process_count` processes hold one item more (10 over 3: 4, 3, 3)."""
  base, extra = divmod(n, process_count)
  start = base * process_index + min(process_index, extra)
  return slice(start, start + base + (process_index < extra))


def derive_seed(*values: int) -> int:
  """Returns a 31-bit seed mixed from `values` (numpy's SeedSequence), e.g. (seed, epoch,
  process)."""
  return int(np.random.SeedSequence(list(values)).generate_state(1)[0] >> 1)


def tfds_data_dir(data_dir: str | None) -> str:
  """Returns the folder tfds reads: `data_dir`, else $TFDS_DATA_DIR, else tfds's default."""
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')
