"""Training metrics: accumulated on the device, fetched only at logging points."""
from __future__ import annotations

import contextlib
import math
import time

import jax
import numpy as np
from absl import logging

from reviewkd_jax.lazy_imports import metric_writers


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; training stops before anything is checkpointed."""


def format_duration(seconds: float) -> str:
  """Returns `seconds` as '1d02h', '3h05m', '4m07s' or '12s'."""
  if not math.isfinite(seconds):
    return '?'
  s = int(seconds)
  d, s = divmod(s, 86400)
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  if d:
    return f'{d}d{h:02d}h'
  if h:
    return f'{h}h{m:02d}m'
  if m:
    return f'{m}m{s:02d}s'
  return f'{s}s'


class MetricLogger:
  """Averages per-step metrics over each logging interval and writes them with clu.

  `add` keeps the device arrays (no host sync); `flush` fetches them, checks that every loss
  is finite, writes the means plus steps/s, images/s and the ETA, and logs a progress line.
  The speed counts training steps only: the first step (which compiles) is timed and
  reported on its own, and time spent inside `paused(what)` (evaluation, checkpoints) is
  left out and reported per `what`. Steps are dispatched asynchronously, so a pause first
  waits for the steps already dispatched: their time is training time.
  """

  def __init__(self, writer: metric_writers.MetricWriter, *, total_steps: int,
               steps_per_epoch: int, global_batch: int, nonfinite_hint=lambda: '',
               clock=time.monotonic):
    self._writer = writer
    self._total, self._per_epoch, self._batch = total_steps, steps_per_epoch, global_batch
    self._hint = nonfinite_hint
    self._clock = clock
    self._pending: list[dict] = []
    self._t0 = clock()
    self._first = True
    self._untimed = 0                       # steps in `_pending` the speed leaves out
    self._paused: dict[str, float] = {}     # since the last flush
    self._paused_total = 0.0                # over the run, for the ETA
    self._timed_steps = 0                   # steps whose time the speed counts
    self._train_total = 0.0
    self.history: list[dict] = []

  @contextlib.contextmanager
  def paused(self, what: str):
    """Leaves the time spent in this block out of the speed; reports it as `what`."""
    if self._pending:
      jax.block_until_ready(self._pending[-1])
    start = self._clock()
    try:
      yield
    finally:
      spent = self._clock() - start
      self._t0 += spent
      self._paused[what] = self._paused.get(what, 0.0) + spent
      self._paused_total += spent

  def add(self, metrics: dict) -> None:
    """Records one step's metrics (device arrays)."""
    self._pending.append(metrics)
    if self._first:  # the first step compiles: time it alone, then start the speed clock
      self._first = False
      jax.block_until_ready(metrics)
      logging.info('First step done in %s (compilation included; not counted in the speed).',
                   format_duration(self._clock() - self._t0))
      self._t0 = self._clock()
      self._untimed = 1

  def flush(self, step: int) -> dict | None:
    """Writes the means since the last flush; raises NonFiniteLossError on NaN/inf losses."""
    if not self._pending:
      return None
    fetched = jax.device_get(self._pending)
    n = len(fetched)
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    bad = {k: v for k, v in means.items() if k.startswith('loss') and not math.isfinite(v)}
    if bad:
      first = next(i for i, m in enumerate(fetched)
                   if not all(math.isfinite(float(m[k])) for k in bad))
      at = step - n + first + 1
      raise NonFiniteLossError(
          f'Non-finite loss at step {at} (epoch {(at - 1) // self._per_epoch}): '
          f'{", ".join(f"{k}={v}" for k, v in bad.items())}. Training stopped before saving '
          f'anything at this point. {self._hint()}')
    timed, self._untimed = n - self._untimed, 0
    elapsed = self._clock() - self._t0
    self._timed_steps += timed
    self._train_total += elapsed
    # No timed step yet (a flush right after the compiling first step, e.g. after a resume):
    # no speed and no ETA rather than 0 steps/s and an ETA of years.
    steps_per_sec = (timed / elapsed if timed and elapsed > 0 else
                     self._timed_steps / self._train_total
                     if self._timed_steps and self._train_total > 0 else float('nan'))
    # ETA: the remaining steps at this speed, plus evaluation/checkpoint time at the rate
    # seen so far per step.
    overhead = self._paused_total / max(step, 1)
    eta = ((self._total - step) * (1 / max(steps_per_sec, 1e-9) + overhead)
           if math.isfinite(steps_per_sec) else float('nan'))
    paused = {f'{k}_seconds': v for k, v in sorted(self._paused.items())}
    means.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * self._batch,
                 epoch=step / self._per_epoch, eta_hours=eta / 3600, **paused)
    self._writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()
                                      if math.isfinite(v) or k.startswith('loss')})
    losses = ', '.join(f'{k[5:]} {v:.4f}' for k, v in means.items() if k.startswith('loss_'))
    extra = f' lambda {means["lambda"]:.3f}' if 'lambda' in means else ''
    other = ''.join(f', {k} {format_duration(v)}' for k, v in sorted(self._paused.items()))
    top1 = f' | top-1 {means["top1"]:.2f}%' if 'top1' in means else ''
    speed = (f'{steps_per_sec:.2f} steps/s, {means["images_per_sec"]:.0f} img/s'
             if math.isfinite(steps_per_sec) else 'speed from the next line on')
    logging.info(
        'step %d/%d (epoch %.2f) | loss %.4f (%s)%s%s | lr %.4g | %s (training only%s) | '
        'ETA %s', step, self._total, step / self._per_epoch, means['loss'], losses, extra,
        top1, means['lr'], speed, other, format_duration(eta))
    self.history.append({'step': step, **means})
    self._pending = []
    self._paused = {}
    self._t0 = self._clock()
    return means
