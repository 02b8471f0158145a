"""Interleaved timing rounds: the runners of one comparison take turns, round after round."""
from __future__ import annotations

import os

import numpy as np


def interleaved_rounds(runners: dict, steps: int, per_round: int) -> list[dict]:
  """Times `steps` steps of every runner in rounds of `per_round` (the last one shorter if
  need be), the runners in turn (J, T, J, T, ...), so that a change of machine load hits them
  alike; each round's ratio is reported on its own.

  A runner has `run_synced(n)` (n steps timed one by one) and `synced` (the seconds of every
  step so far); the one named 'jax' also runs `run_pipelined(n)` (n steps back to back) in
  each round. Returns a dict per round: the 1-minute load average, `<name>_ms` (the round's
  median step of each runner) and, for every runner but 'jax', `speedup_vs_<name>` (its
  median over JAX's).
  """
  out, done = [], 0
  while done < steps:
    n = min(per_round, steps - done)
    this_round = {'load_average': os.getloadavg()[0]}
    for name, runner in runners.items():
      first = len(runner.synced)
      runner.run_synced(n)
      this_round[f'{name}_ms'] = float(np.median(runner.synced[first:])) * 1e3
      if name == 'jax':
        runner.run_pipelined(n)
    for name in runners:
      if name != 'jax':
        this_round[f'speedup_vs_{name}'] = this_round[f'{name}_ms'] / this_round['jax_ms']
    out.append(this_round)
    done += n
  return out


def speedups(rounds: list[dict]) -> dict[str, dict]:
  """Returns {runner: {'median', 'min', 'max'}} of the per-round speedups of JAX over each
  runner other than JAX in `rounds` (`interleaved_rounds`)."""
  prefix = 'speedup_vs_'
  names = [k[len(prefix):] for k in rounds[0] if k.startswith(prefix)] if rounds else []
  out = {}
  for name in names:
    ratios = [r[prefix + name] for r in rounds]
    out[name] = {'median': float(np.median(ratios)), 'min': min(ratios), 'max': max(ratios)}
  return out
