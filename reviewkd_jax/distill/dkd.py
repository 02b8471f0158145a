"""'dkd': decoupled KD (Zhao et al., CVPR 2022) as mdistiller runs it, `losses.dkd_loss`:
`dkd_alpha` 1, `dkd_beta` 8 (configs/cifar100_table1.py: mdistiller's per pair),
`dkd_temperature` 4, warm-up `min(1, (epoch + 1) / dkd_warmup_epochs)` (mdistiller counts
epochs from 1).
"""
from __future__ import annotations

from reviewkd_jax import losses
from reviewkd_jax.distill import base


def _terms(ctx: base.LossContext):
  c = ctx.config
  epoch = ctx.epoch + 1 if c.dkd_warmup_epochs else None  # mdistiller's epochs are 1-based
  loss = losses.dkd_loss(ctx.student_out.logits, ctx.teacher_out.logits, ctx.batch['label'],
                         alpha=c.dkd_alpha, beta=c.dkd_beta, temperature=c.dkd_temperature,
                         epoch=epoch, warmup_epochs=c.dkd_warmup_epochs)
  logs = ({'dkd_warmup': losses.dkd_warmup(epoch, c.dkd_warmup_epochs)} if epoch is not None
          else {})
  return {'dkd': loss}, logs


def _check(config):
  if config.dkd_warmup_epochs < 0:
    raise ValueError(f'config.dkd_warmup_epochs must be >= 0, got {config.dkd_warmup_epochs}.')


base.register_adapter_method('dkd', None, _terms, _check)
