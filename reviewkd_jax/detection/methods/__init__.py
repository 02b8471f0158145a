"""Detection distillation methods by name (`config.method` of a detection config).

`base` holds the contract (`DetectionMethod`, `DetectionLossContext`) and the registry;
every other module here is one method (its adapter, its init inputs, its loss terms, its
checks), registering itself: `alone` ('none'), `reviewkd`, `kd`, `fitnet`, `fgfi`. The
losses and modules they use are `reviewkd_jax.detection.distill`. To add a method, add one
module here: every module of this package is imported below.
"""
import importlib
import pkgutil

from reviewkd_jax.detection.methods.base import (DetectionLossContext, DetectionMethod,
                                                 get_detection_method, list_detection_methods,
                                                 register_detection_method)

# Importing a method module registers its method.
METHOD_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                              if m.name != 'base'))
for _name in METHOD_MODULES:
  importlib.import_module(f'{__name__}.{_name}')

__all__ = ['DetectionLossContext', 'DetectionMethod', 'get_detection_method',
           'list_detection_methods', 'register_detection_method']
