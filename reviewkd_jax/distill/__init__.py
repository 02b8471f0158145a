"""Training methods by name (`config.method`): ReviewKD and the paper's comparison methods.

`base` holds the contract (`Method`, `LossContext`, `DistillOutput`), the registry and what
the methods share; every other module here is one method, holding everything it adds (its
trainable head, its loss terms, its config checks) and registering itself:

- `alone`: 'none', the network trained alone (teachers, student baselines);
- `reviewkd`: 'reviewkd', ABF + HCL (the paper's method);
- `kd`, `fitnet`, `at`, `pkt`, `rkd`, `crd`, `vid`, `ofd`, `dkd`: the comparison methods.

The loss functions themselves are pure functions in `reviewkd_jax.losses`. To add a method,
write one module here that calls `base.register_method` (or `base.register_head_method`)
and import it below.
"""
from reviewkd_jax.distill import base
from reviewkd_jax.distill.base import (DistillOutput, LossContext, Method, get_method,
                                       list_methods, register_method)

# Importing a method module registers its method.
from reviewkd_jax.distill import alone  # noqa: F401,E402
from reviewkd_jax.distill import reviewkd  # noqa: F401,E402
from reviewkd_jax.distill import kd  # noqa: F401,E402
from reviewkd_jax.distill import fitnet  # noqa: F401,E402
from reviewkd_jax.distill import at  # noqa: F401,E402
from reviewkd_jax.distill import pkt  # noqa: F401,E402
from reviewkd_jax.distill import rkd  # noqa: F401,E402
from reviewkd_jax.distill import crd  # noqa: F401,E402
from reviewkd_jax.distill import vid  # noqa: F401,E402
from reviewkd_jax.distill import ofd  # noqa: F401,E402
from reviewkd_jax.distill import dkd  # noqa: F401,E402

__all__ = ['DistillOutput', 'LossContext', 'Method', 'base', 'get_method', 'list_methods',
           'register_method']
