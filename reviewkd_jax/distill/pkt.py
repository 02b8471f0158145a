"""'pkt': probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) on the pooled
embeddings (`feat[-1]`), `losses.pkt_loss`; weight `pkt_weight` (30000).
"""
from __future__ import annotations

from reviewkd_jax import losses
from reviewkd_jax.distill import base


def _terms(ctx: base.LossContext):
  return {'pkt': losses.pkt_loss(ctx.student_out.features['pooled'],
                                 ctx.teacher_out.features['pooled'],
                                 weight=ctx.config.pkt_weight)}, {}


base.register_adapter_method('pkt', None, _terms)
