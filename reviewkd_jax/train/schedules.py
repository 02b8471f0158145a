"""The classification run's learning-rate schedule and the step -> epoch map (traced: no
recompilation). The detection run's schedule is `train.detection.detector_lr_schedule`.

Loss-weight warm-ups belong to the methods: `distill.base.warmup_factor`.
"""
from __future__ import annotations

from typing import Sequence

import optax


def classifier_lr_schedule(base_lr: float, *, steps_per_epoch: int,
                           decay_epochs: Sequence[int], decay_factor: float) -> optax.Schedule:
  """Returns step -> lr: `base_lr`, times `decay_factor` from each 0-based epoch in `decay_epochs`.

  Each entry is the first epoch at the decayed value: the authors' CIFAR script decays after
  finishing epochs 150, 180, 210, i.e. `decay_epochs=(151, 181, 211)`; their ImageNet script
  decays from epochs 30, 60, 90.
  """
  if list(decay_epochs) != sorted(decay_epochs):
    raise ValueError(f'lr_decay_epochs must be increasing, got {tuple(decay_epochs)}')
  return optax.piecewise_constant_schedule(
      base_lr, {int(e) * steps_per_epoch: decay_factor for e in decay_epochs})


def epoch_of(step, steps_per_epoch: int):
  """Returns the 0-based epoch that global `step` (0-based) belongs to."""
  return step // steps_per_epoch

