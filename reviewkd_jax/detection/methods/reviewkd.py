"""'reviewkd': the authors' five ABFs over the student's FPN levels, HCL against the
teacher's levels, times `config.reviewkd_weight` (`distill.FPNReview`, `reviewkd_loss`)."""
from reviewkd_jax.detection import distill
from reviewkd_jax.detection.methods.base import DetectionMethod, register_detection_method


def _build(config, teacher_channels):
  return distill.FPNReview(mid_channels=config.fpn_channels,
                           out_channels=teacher_channels['p2'])


def _inputs(features):
  return (distill.pyramid(features),), {'train': False}


def _terms(ctx):
  outs, state = ctx.adapter.apply(ctx.adapter_variables, distill.pyramid(ctx.features),
                                  train=True, mutable=['batch_stats'])
  loss = distill.reviewkd_loss(outs, distill.pyramid(ctx.teacher_features),
                               weight=ctx.config.reviewkd_weight)
  return {'loss_reviewkd': loss}, state


register_detection_method(DetectionMethod(
    name='reviewkd', uses_teacher=True, build_adapter=_build, adapter_inputs=_inputs,
    loss_terms=_terms))
