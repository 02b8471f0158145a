"""'kd': logit distillation alone, `ce_weight * CE + kd_weight * KL(t/T || s/T) * T^2`
(Hinton et al., 2015), as the CRD benchmark runs it (`-r 0.1 -a 0.9`: ce_weight 0.1,
kd_weight 0.9; configs/cifar100_table1.py sets them). The term itself is the optional logit
KD term every method adds (`base.logit_kd_terms`); this method has nothing else.
"""
from __future__ import annotations

from reviewkd_jax.distill import base


def _check(config):
  if not config.kd_weight > 0:
    raise ValueError("config.method='kd' is ce_weight * CE + kd_weight * KD: set "
                     '--config.kd_weight > 0 (the CRD benchmark uses 0.9 with ce_weight 0.1).')


base.register_adapter_method('kd', None, lambda ctx: ({}, {}), _check)
