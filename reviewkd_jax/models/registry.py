"""Name -> constructor registry for every backbone."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


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


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
  """Returns the linen module registered as `name` (case-sensitive, as in the KD codebases)."""
  if name not in _REGISTRY:
    close = [n for n in _REGISTRY if n.lower() == name.lower()]
    hint = f' Did you mean {close[0]!r}? Names are case-sensitive.' if close else ''
    raise ValueError(
        f'Unknown model {name!r}.{hint} Known models: {", ".join(list_models())}.')
  return _REGISTRY[name](num_classes=num_classes, **kwargs)
