"""PyTorch's CPU threads when another process keeps one of this machine's cores busy (as the
other pytest-xdist worker does): torchvision's ResNet-18 forward and backward at 224 px,
batch 4, in float32 and float64 (what the ImageNet parity tests' reference loops run), with
as many threads as cores and with one fewer, in alternating rounds, beside a process that
spins on one core for the whole measurement.

  python benchmarks/torch_threads_beside_busy_core.py [--rounds=4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spin():
  while True:
    pass


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=4)
  rounds = parser.parse_args().rounds
  import torch  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.testing import torchvision  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  counts = (cores, max(1, cores - 1))
  torch.manual_seed(0)
  models = {torch.float32: torchvision().models.resnet18()}
  models[torch.float64] = torchvision().models.resnet18().double()
  x = torch.randn(4, 3, 224, 224)

  def step(dtype):
    model = models[dtype]
    model.zero_grad()
    model(x.to(dtype)).sum().backward()

  for dtype in models:   # warm-up outside the timing
    step(dtype)
  spinner = multiprocessing.Process(target=_spin, daemon=True)
  spinner.start()
  times = {(d, n): [] for d in models for n in counts}
  try:
    for r in range(rounds):
      for n in (counts if r % 2 == 0 else counts[::-1]):
        torch.set_num_threads(n)
        for dtype in models:
          start = time.perf_counter()
          step(dtype)
          times[(dtype, n)].append(time.perf_counter() - start)
  finally:
    spinner.terminate()
  print(f'{cores} cores, one kept busy by a spinning process; 1-minute load average at the '
        f'end {os.getloadavg()[0]:.2f}; median of {rounds} alternating rounds, seconds per step')
  print('| step | ' + ' | '.join(f'{n} thread(s)' for n in counts) + ' |')
  print('|---|' + '---|' * len(counts))
  for dtype in models:
    print(f'| ResNet-18 fwd+bwd, {str(dtype).split(".")[-1]} | ' +
          ' | '.join(f'{statistics.median(times[(dtype, n)]):.2f}' for n in counts) + ' |')


if __name__ == '__main__':
  main()
