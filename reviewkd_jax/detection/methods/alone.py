"""'none': the detector trained alone (teachers, student baselines); no teacher, no adapter."""
from reviewkd_jax.detection.methods.base import DetectionMethod, register_detection_method


def _no_terms(ctx):
  return {}, ctx.adapter_state


register_detection_method(DetectionMethod(name='none', uses_teacher=False,
                                          loss_terms=_no_terms))
