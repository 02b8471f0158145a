"""Name -> constructor registry for every backbone, and models named by import path.

A name of the form `'package.module:Attribute'` (any Flax classifier, `models.imported`) is
built on demand; `set_feature_outputs` tells it which of the network's outputs are its
features.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn

from reviewkd_jax.models import imported

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_OUTPUTS: dict[str, tuple[str, ...]] = {}


def register_model(*names: str):
  """Returns a decorator that registers a constructor under each of `names`."""

  def wrap(fn: Callable[..., nn.Module]):
    for name in names:
      if name in _REGISTRY:
        raise ValueError(f'model name {name!r} registered twice')
      _REGISTRY[name] = fn
    return fn

  return wrap


def list_models() -> list[str]:
  """Returns the sorted list of registered model names."""
  return sorted(_REGISTRY)


def set_feature_outputs(name: str, outputs: Sequence[str]) -> None:
  """Sets the feature outputs (module paths, shallow to deep) of the import-path model `name`.

  `create_model(name)` then returns features `stages` = `preact` = those outputs as maps and
  `pooled` (`models.imported.ImportedModel`); `()` clears them.
  """
  if not imported.is_import_path(name):
    raise ValueError(f'{name!r} is not an import path (package.module:Attribute); registered '
                     'models have their own features.')
  if not isinstance(outputs, str) and not tuple(outputs):
    _OUTPUTS.pop(name, None)
  else:
    _OUTPUTS[name] = imported.check_names(outputs, f'the feature outputs of {name!r}')


def set_outputs_from_config(config: Any) -> None:
  """Sets the feature outputs of a config's models named by import path.

  `config.model` / `config.teacher` that are import paths get `config.model_outputs` /
  `config.teacher_outputs` (`set_feature_outputs`). Raises ValueError for outputs given to a
  registered model, and for a 'reviewkd' run whose imported model has none. What `main.py`
  calls before a run; configs without these fields (detection) are left alone.
  """
  if 'model_outputs' not in config:
    return
  if (config.model == config.teacher and imported.is_import_path(config.model)
      and config.model_outputs != config.teacher_outputs):
    raise ValueError(f'config.model and config.teacher are both {config.model!r} but name '
                     'different feature outputs: use one list, or two import paths.')
  for field in ('model', 'teacher'):
    # `--config.model_outputs=a,b` arrives as ('a,b',): names never hold commas.
    given = config[f'{field}_outputs']
    given = (given,) if isinstance(given, str) else given
    outputs = tuple(n.strip() for names in given for n in names.split(',') if n.strip())
    name = config[field]
    if name and imported.is_import_path(name):
      if not outputs and config.method == 'reviewkd':
        raise ValueError(
            f'config.{field}={name!r} is a model of yours: set config.{field}_outputs to the '
            'names of its feature outputs, shallow to deep (module paths), for ReviewKD.')
      set_feature_outputs(name, outputs)
    elif outputs:
      raise ValueError(
          f'config.{field}_outputs={outputs} names feature outputs, but config.{field}='
          f'{name!r} is not a model by import path (package.module:Attribute): registered '
          'models have their own features (config.student_features/teacher_features).')


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
  """Returns the linen module registered as `name` (case-sensitive, as in the KD codebases),
  or the Flax module an import path `'package.module:Attribute'` names, as a backbone."""
  if name not in _REGISTRY and imported.is_import_path(name):
    return imported.import_model(name, num_classes=num_classes,
                                 outputs=_OUTPUTS.get(name, ()), **kwargs)
  if name not in _REGISTRY:
    close = [n for n in _REGISTRY if n.lower() == name.lower()]
    hint = f' Did you mean {close[0]!r}? Names are case-sensitive.' if close else ''
    raise ValueError(
        f'Unknown model {name!r}.{hint} Known models: {", ".join(list_models())}; or a Flax '
        "module of yours by import path, 'package.module:ClassName'.")
  return _REGISTRY[name](num_classes=num_classes, **kwargs)
