"""'fitnet': a 1x1 conv + BN + ReLU regressor from the student's res3 output to the
teacher's, MSE times `config.fitnet_weight` (`distill.FitNetAdapter`, `fitnet_loss`)."""
from reviewkd_jax.detection import distill
from reviewkd_jax.detection.methods.base import DetectionMethod, register_detection_method

LEVEL = distill.FITNET_LEVEL


def _build(config, teacher_channels):
  del config
  return distill.FitNetAdapter(out_channels=teacher_channels[LEVEL])


def _inputs(features):
  return (features[LEVEL],), {'train': False}


def _terms(ctx):
  adapted, state = ctx.adapter.apply(ctx.adapter_variables, ctx.features[LEVEL], train=True,
                                     mutable=['batch_stats'])
  loss = distill.fitnet_loss(adapted, ctx.teacher_features[LEVEL],
                             weight=ctx.config.fitnet_weight)
  return {'loss_fitnet': loss}, state


register_detection_method(DetectionMethod(
    name='fitnet', uses_teacher=True, build_adapter=_build, adapter_inputs=_inputs,
    loss_terms=_terms))
