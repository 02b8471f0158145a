"""Training methods by name (`config.method`): ReviewKD and the paper's comparison methods.

`base` holds the contract (`Method`, `LossContext`, `DistillOutput`), the registry and what
the methods share; every other module here is one method, holding everything it adds (its
adapter, its loss terms, its config checks) and registering itself:

- `alone`: 'none', the network trained alone (teachers, student baselines);
- `reviewkd`: 'reviewkd', ABF + HCL (the paper's method) and its ablation switches;
- `kd`, `fitnet`, `at`, `pkt`, `rkd`, `crd`, `vid`, `ofd`, `dkd`: the comparison methods.

The loss functions themselves are pure functions in `reviewkd_jax.losses`. To add a method,
add one module here that calls `base.register_method` (or `base.register_adapter_method`):
every module of this package is imported below, so nothing else needs to change.
"""
import importlib
import pkgutil

from reviewkd_jax.distill import base
from reviewkd_jax.distill.base import (DistillOutput, LossContext, Method, get_method,
                                       list_methods, register_method)

# Importing a method module registers its method.
METHOD_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                              if m.name != 'base'))
for _name in METHOD_MODULES:
  importlib.import_module(f'{__name__}.{_name}')

__all__ = ['DistillOutput', 'LossContext', 'Method', 'base', 'get_method', 'list_methods',
           'register_method']
