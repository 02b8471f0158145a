"""'at': attention transfer (Zagoruyko & Komodakis, ICLR 2017) on the stage maps
(`feat[1:-1]` of the CRD benchmark), `losses.at_loss`; weight `at_weight` (1000), `at_p` 2.
"""
from __future__ import annotations

from reviewkd_jax import losses
from reviewkd_jax.distill import base


def _adapter(config, spec, dtype, student, teacher):
  del spec, dtype
  base.check_stage_pairs('AT', config, student, teacher, 'stages')


def _terms(ctx: base.LossContext):
  c = ctx.config
  return {'at': losses.at_loss(ctx.student_out.features['stages'],
                               ctx.teacher_out.features['stages'], p=c.at_p,
                               weight=c.at_weight)}, {}


base.register_adapter_method('at', _adapter, _terms)
