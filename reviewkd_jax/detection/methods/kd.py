"""'kd': KD on the RoI classification logits, the teacher's RoI head run on the student's
sampled RoIs, times `config.kd_weight` at `config.kd_temperature` (`distill.roi_kd_loss`).
No adapter."""
from reviewkd_jax.detection import distill
from reviewkd_jax.detection.methods.base import DetectionMethod, register_detection_method


def _terms(ctx):
  rois = ctx.roi_outputs
  t_logits = distill.teacher_roi_logits(ctx.teacher, ctx.teacher_variables,
                                        ctx.teacher_features, rois['samples'].boxes)
  loss = distill.roi_kd_loss(rois['class_logits'], t_logits, rois['samples'].valid,
                             temperature=ctx.config.kd_temperature,
                             weight=ctx.config.kd_weight)
  return {'loss_kd': loss}, ctx.adapter_state


register_detection_method(DetectionMethod(name='kd', uses_teacher=True, loss_terms=_terms,
                                          needs_roi_outputs=True))
