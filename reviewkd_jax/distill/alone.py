"""'none': config.model trained alone, with cross-entropy only (teachers, student baselines)."""
from __future__ import annotations

from reviewkd_jax.distill import base
from reviewkd_jax.models import create_model


def _build(config, spec, dtype):
  return create_model(config.model, num_classes=spec.num_classes, dtype=dtype), None


def _check(config):
  if config.teacher or config.teacher_weights:
    raise ValueError(
        "config.method='none' trains config.model alone, but config.teacher/"
        'teacher_weights are set: clear them, or choose a distillation method '
        f'(config.method, one of {", ".join(m for m in base.list_methods() if m != "none")}).')


base.register_method(base.Method(name='none', uses_teacher=False, build=_build,
                                 loss_terms=lambda ctx: ({}, {}), check_config=_check))
