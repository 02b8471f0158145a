"""'rkd': relational KD (Park et al., CVPR 2019) on the pooled embeddings (`feat[-1]`),
`losses.rkd_loss`; `rkd_distance_weight` 25, `rkd_angle_weight` 50.
"""
from __future__ import annotations

from reviewkd_jax import losses
from reviewkd_jax.distill import base


def _terms(ctx: base.LossContext):
  c = ctx.config
  return {'rkd': losses.rkd_loss(ctx.student_out.features['pooled'],
                                 ctx.teacher_out.features['pooled'],
                                 distance_weight=c.rkd_distance_weight,
                                 angle_weight=c.rkd_angle_weight)}, {}


base.register_adapter_method('rkd', None, _terms)
