"""Any Flax module as a backbone: its intermediate outputs read by name, and import paths.

A feature is named by the path of the submodule whose `__call__` returns it, '/'-joined from
the network's root as Flax's `capture_intermediates` lists it (`'block1'`,
`'Encoder_0/layer_3'`, `'layers_2'` for the third layer of an `nn.Sequential`). The values
are recorded with a method interceptor (`nn.intercept_methods`) while the network runs, so
nothing in the network changes and nothing is stored in its variables. `distill.custom`
also reads values the network sows into its `'intermediates'` collection.

Every feature becomes an NHWC map for ReviewKD (`to_map`):

- (N, H, W, C): as it is;
- (N, C), a pooled embedding: (N, 1, 1, C);
- (N, T, C), a ViT-style token sequence: T = S * S tokens are reshaped row-major to
  (N, S, S, C); if T is not a square but T - 1 is, the first token (the class token) is
  dropped first. Other token counts (several extra tokens, non-square patch grids) stop with
  an error: sow the map you want instead.

`ImportedModel` wraps a module as a registered backbone (`ModelOutput(logits, features)`,
features `stages` = `preact` = the named outputs as maps, shallow to deep, and `pooled` = the
spatial mean of the last of them); `registry.create_model` builds one for a name of the
form `'package.module:Attribute'`. Imports nothing from the project but `layers`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.models.layers import ModelOutput


class FeatureOutputError(ValueError):
  """A named feature output that is missing or cannot be used as a ReviewKD level."""


def is_import_path(name: str) -> bool:
  """Returns True for a model name of the form 'package.module:Attribute'."""
  module, sep, attr = name.partition(':')
  return bool(sep and module and attr)


def path_text(path: Sequence[str]) -> str:
  """Returns a module path tuple as the '/'-joined name used for feature outputs."""
  return '/'.join(str(p) for p in path)


@contextlib.contextmanager
def record_calls(prefix: Sequence[str], sink: dict[str, list]) -> Iterator[None]:
  """Records, while active, what every `__call__` of a module below `prefix` returns.

  `sink[path]` gets one entry per call, `path` relative to `prefix` ('/'-joined; the module
  at `prefix` itself is skipped). Works under `jit`, `init` and `eval_shape` alike.
  """
  prefix = tuple(prefix)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      path = tuple(context.module.path)
      if len(path) > len(prefix) and path[:len(prefix)] == prefix:
        sink.setdefault(path_text(path[len(prefix):]), []).append(out)
    return out

  with nn.intercept_methods(interceptor):
    yield


def is_array(value: Any) -> bool:
  """Returns True for an array, a tracer or a ShapeDtypeStruct."""
  return isinstance(value, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(value, 'aval')


def describe(value: Any) -> str:
  """Returns a short description of a recorded output: its shape, or its type."""
  if is_array(value):
    return str(tuple(value.shape))
  return f'a {type(value).__name__}, not an array'


def available_text(outputs: dict[str, list]) -> str:
  """Returns the recorded outputs as lines 'path: shape' (call order), for error messages."""
  lines = []
  for path, values in outputs.items():
    calls = f' (called {len(values)} times)' if len(values) > 1 else ''
    lines.append(f'  {path}: {describe(values[-1])}{calls}')
  return '\n'.join(lines) if lines else '  (none: the network has no submodules)'


def pick(outputs: dict[str, list], name: str, *, owner: str) -> jax.Array:
  """Returns the single array recorded under `name`, or raises FeatureOutputError."""
  if name not in outputs:
    raise FeatureOutputError(
        f'{owner} has no output {name!r}. Its outputs (module paths, in call order, with '
        f'their shapes):\n{available_text(outputs)}')
  values = outputs[name]
  if len(values) != 1:
    raise FeatureOutputError(
        f'{owner} output {name!r} is produced {len(values)} times per call (a shared module): '
        'name a module that runs once, or sow the feature you want.')
  value = values[0]
  if not is_array(value):
    raise FeatureOutputError(
        f'{owner} output {name!r} is {describe(value)}: name a submodule that returns one '
        'array, or sow the feature you want.')
  return value


def map_shape(shape: Sequence[int], *, name: str, owner: str, batch: int | None = None
              ) -> tuple[int, int, int, int]:
  """Returns the NHWC shape `to_map` gives an output of `shape`, or raises FeatureOutputError.

  `batch`, when given, must be the output's leading dimension (the input's batch).
  """
  shape = tuple(int(d) for d in shape)
  if batch is not None and (not shape or shape[0] != batch):
    raise FeatureOutputError(
        f'{owner} output {name!r} has shape {shape}, whose first axis is not the batch '
        f'({batch}): name an output shaped (N, H, W, C), (N, tokens, C) or (N, C).')
  if len(shape) == 4:
    return shape
  if len(shape) == 2:
    return (shape[0], 1, 1, shape[1])
  if len(shape) == 3:
    n, tokens, c = shape
    side = math.isqrt(tokens)
    if side * side == tokens:
      return (n, side, side, c)
    side = math.isqrt(tokens - 1) if tokens > 1 else 0
    if side * side == tokens - 1 and side > 0:
      return (n, side, side, c)
    raise FeatureOutputError(
        f'{owner} output {name!r} has shape {shape}: {tokens} tokens are neither a square grid '
        'nor one class token plus a square grid, so they cannot be reshaped to a map. Sow the '
        'patch tokens as an (N, H, W, C) map and name that.')
  raise FeatureOutputError(
      f'{owner} output {name!r} has shape {shape}: ReviewKD needs (N, H, W, C) maps, '
      '(N, tokens, C) token sequences or (N, C) vectors.')


def to_map(x: jax.Array, *, name: str, owner: str) -> jax.Array:
  """Returns output `x` as an NHWC map by the rules of the module docstring."""
  shape = map_shape(x.shape, name=name, owner=owner)
  if x.ndim == 3 and x.shape[1] != shape[1] * shape[2]:
    x = x[:, 1:]  # the class token
  return x.reshape(shape)


def check_names(names: Any, what: str) -> tuple[str, ...]:
  """Returns `names` as a tuple of strings, or raises ValueError for a single string."""
  if isinstance(names, str):
    raise ValueError(f'{what} must be a list of output names, got the string {names!r}.')
  names = tuple(names)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f'{what} must be a non-empty list of output names, got {names!r}.')
  return names


def _call_kwargs(net: nn.Module, train: bool) -> dict:
  """Returns `train=` or `deterministic=` for `net.__call__`, whichever it takes."""
  params = inspect.signature(type(net).__call__).parameters
  if 'train' in params:
    return {'train': train}
  if 'deterministic' in params:
    return {'deterministic': not train}
  return {}


def _logits(out: Any) -> jax.Array:
  if isinstance(out, (tuple, list)):
    out = out[0]
  if hasattr(out, 'logits'):
    out = out.logits
  return out


class ImportedModel(nn.Module):
  """Any Flax classifier as a backbone: `ModelOutput(logits, features)`.

  The network's variables are its own (the same tree as `net.init` gives: the wrapper shares
  its scope), so checkpoints written by the trainer load into `net` directly. It is called
  with `train=train` if its `__call__` takes `train`, else with `deterministic=not train`
  if it takes that, else with the input only. Its output is the logits, or a tuple whose
  first element is.

  Attributes:
    net: the user's module.
    outputs: the names of its feature outputs, shallow to deep (module docstring); `()` for
      a network trained without feature distillation (its `features` are then empty).
    num_classes: the logits' size, checked when the network first runs.
    label: the name in messages (the import path).
  """
  net: nn.Module
  outputs: tuple[str, ...] = ()
  num_classes: int | None = None
  label: str = 'the network'

  def setup(self):
    nn.share_scope(self, self.net)

  def __call__(self, x: jax.Array, *, train: bool) -> ModelOutput:
    recorded: dict[str, list] = {}
    with record_calls(self.path, recorded):
      out = self.net(x, **_call_kwargs(self.net, train))
    logits = _logits(out)
    if self.num_classes is not None and (
        getattr(logits, 'ndim', 0) != 2 or logits.shape[-1] != self.num_classes):
      raise FeatureOutputError(
          f'{self.label} returned {describe(logits)} where the logits (N, '
          f'{self.num_classes}) of the dataset\'s {self.num_classes} classes were expected.')
    if not self.outputs:
      return ModelOutput(logits, {})
    owner = f'Model {self.label!r}'
    maps = []
    for name in self.outputs:
      value = pick(recorded, name, owner=owner)
      map_shape(value.shape, name=name, owner=owner, batch=x.shape[0])
      maps.append(to_map(value, name=name, owner=owner))
    pooled = jnp.mean(maps[-1].astype(jnp.float32), axis=(1, 2)).astype(maps[-1].dtype)
    return ModelOutput(logits, {'stages': maps, 'preact': maps, 'pooled': pooled})


def load_attribute(path: str) -> Any:
  """Returns the object an import path 'package.module:Attribute' names; ValueError if none."""
  module_name, _, attr = path.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
        f'Model {path!r}: cannot import {module_name!r} ({e}). The folder that holds '
        f'{module_name.split(".")[0]!r} must be on PYTHONPATH (or be the current '
        'directory).') from e
  obj = module
  for part in attr.split('.'):
    if not hasattr(obj, part):
      names = sorted(n for n, v in vars(module).items() if not n.startswith('_') and (
          isinstance(v, nn.Module) or (isinstance(v, type) and issubclass(v, nn.Module))))
      raise ValueError(f'Model {path!r}: {module_name!r} has no attribute {attr!r}. Its Flax '
                       f'modules: {", ".join(names) or "none"}.')
    obj = getattr(obj, part)
  return obj


def _accepted(obj: Any) -> set[str] | None:
  """Returns the keyword names `obj(...)` accepts (None: any)."""
  if isinstance(obj, type) and issubclass(obj, nn.Module):
    return {f.name for f in dataclasses.fields(obj) if f.init}
  params = inspect.signature(obj).parameters.values()
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return None
  return {p.name for p in params}


def import_model(path: str, *, num_classes: int, outputs: Sequence[str] = (),
                 dtype: Any = jnp.float32) -> ImportedModel:
  """Returns the module an import path names, wrapped as a backbone (`ImportedModel`).

  The attribute is a Flax module class or a function returning a module (called with
  `num_classes=` and `dtype=` when it takes them), or a module instance (used as it is).
  A network that takes no `dtype` only runs in float32.
  """
  obj = load_attribute(path)
  if isinstance(obj, nn.Module):
    net = obj
  elif callable(obj):
    accepted = _accepted(obj)
    kwargs = {}
    if accepted is None or 'num_classes' in accepted:
      kwargs['num_classes'] = num_classes
    if accepted is None or 'dtype' in accepted:
      kwargs['dtype'] = dtype
    elif jnp.dtype(dtype) != jnp.float32:
      raise ValueError(f'Model {path!r} takes no dtype argument, so it cannot compute in '
                       f'{jnp.dtype(dtype).name}: set config.dtype=float32.')
    net = obj(**kwargs)
    if not isinstance(net, nn.Module):
      raise ValueError(f'Model {path!r} returned a {type(net).__name__}, not a Flax module.')
  else:
    raise ValueError(f'Model {path!r} names a {type(obj).__name__}: name a Flax module class, '
                     'a function returning a module, or a module instance.')
  return ImportedModel(net, tuple(outputs), num_classes, path)
