"""The benchmark's interleaved timing rounds (`bench.rounds`), on runners that only count."""
import pytest

from reviewkd_jax.bench import rounds


class _Runner:
  """Records its calls; every synced step 'takes' `ms` milliseconds."""

  def __init__(self, ms: float, calls: list, name: str):
    self.ms, self.calls, self.name = ms, calls, name
    self.synced: list[float] = []

  def run_synced(self, n: int):
    self.calls.append((self.name, 'synced', n))
    self.synced.extend([self.ms / 1e3] * n)

  def run_pipelined(self, n: int):
    self.calls.append((self.name, 'pipelined', n))


def test_runners_take_turns_and_each_round_has_its_ratio():
  calls = []
  runners = {'jax': _Runner(2.0, calls, 'jax'), 'torch_eager': _Runner(5.0, calls, 'torch')}
  out = rounds.interleaved_rounds(runners, steps=5, per_round=2)
  assert calls == [('jax', 'synced', 2), ('jax', 'pipelined', 2), ('torch', 'synced', 2),
                   ('jax', 'synced', 2), ('jax', 'pipelined', 2), ('torch', 'synced', 2),
                   ('jax', 'synced', 1), ('jax', 'pipelined', 1), ('torch', 'synced', 1)]
  assert [set(r) for r in out] == [{'load_average', 'jax_ms', 'torch_eager_ms',
                                    'speedup_vs_torch_eager'}] * 3
  assert [r['speedup_vs_torch_eager'] for r in out] == pytest.approx([2.5] * 3)
  assert rounds.speedups(out) == {'torch_eager': pytest.approx(
      {'median': 2.5, 'min': 2.5, 'max': 2.5})}


def test_jax_alone_has_no_speedups():
  out = rounds.interleaved_rounds({'jax': _Runner(1.0, [], 'jax')}, steps=3, per_round=3)
  assert len(out) == 1 and rounds.speedups(out) == {}
  assert rounds.speedups([]) == {}
