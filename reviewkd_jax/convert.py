"""PyTorch state_dict -> Flax variables, for every backbone and for ReviewKD students.

One naming rule serves every model: a PyTorch module path becomes the Flax module path by
merging each all-digit component into the component before it
(`layer1.0.conv1` -> `layer1_0/conv1`, `features.3` -> `features_3`,
`abfs.0.conv1.1` -> `abfs_0/conv1_1`). Our linen modules are named so that this rule holds,
which is what makes the converter generic. Leaves map as

  weight (4-D, OIHW)  -> params/.../kernel (HWIO; grouped and depthwise convs included)
  weight (2-D, out x in) -> params/.../kernel (in x out)
  weight (1-D, BatchNorm) -> params/.../scale
  bias                -> params/.../bias
  running_mean / running_var -> batch_stats/.../mean / var
  num_batches_tracked -> dropped (Flax's BatchNorm has no counter)

Every conversion is checked against a Flax variables template (from `model.init` or
`jax.eval_shape`): anything missing, unexpected or mis-shaped raises `StateDictMismatchError`
listing the keys, and nothing is silently left at its initial value.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

# Wrappers people save state_dicts in: {'model': sd}, {'state_dict': sd}, {'net': sd}.
_WRAPPER_KEYS = ('state_dict', 'model', 'net', 'student')
_DIGIT = re.compile(r'^\d+$')


class StateDictMismatchError(ValueError):
  """A state_dict does not fit the Flax model it is loaded into."""


def module_path(torch_module_path: str) -> tuple[str, ...]:
  """Returns the Flax module path for a dotted PyTorch module path."""
  out: list[str] = []
  for part in torch_module_path.split('.') if torch_module_path else []:
    if _DIGIT.match(part) and out:
      out[-1] = f'{out[-1]}_{part}'
    else:
      out.append(part)
  return tuple(out)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch here
    value = value.detach().cpu().float().numpy() if value.is_floating_point() else (
        value.detach().cpu().numpy())
  return np.asarray(value)


class WeightsFileError(ValueError):
  """A weights file cannot be read as one (a folder, an empty, truncated or foreign file, or
  one that holds no dict of arrays)."""


def _describe(path: str | os.PathLike) -> str:
  try:
    return f'{os.path.getsize(path)} bytes'
  except OSError:
    return 'unreadable'


def check_weights_path(path: str | os.PathLike, kind: str) -> None:
  """Raises WeightsFileError when `path` is a folder or an empty file, not a `kind` file."""
  if os.path.isdir(path):
    raise WeightsFileError(f'{path} is a folder, not a {kind} file: give the file itself.')
  if os.path.exists(path) and os.path.getsize(path) == 0:
    raise WeightsFileError(f'{path} is empty (0 bytes), not a {kind} file: copy it again.')


def unreadable(path: str | os.PathLike, kind: str, error: Exception) -> WeightsFileError:
  """Returns the one-line error for a `kind` file whose reader failed with `error`."""
  text = str(error).strip().splitlines()
  why = text[0].split('. ')[0][:160] if text else type(error).__name__  # its first sentence
  if 'Weights only load failed' in why:
    why = ('not tensors saved by torch.save, or Python objects besides tensors, which are '
           'never loaded')
  return WeightsFileError(f'{path} ({_describe(path)}) is not a readable {kind} file '
                          f'({type(error).__name__}: {why}); it may be truncated or another '
                          'kind of file: download or copy it again.')


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
  """Returns the flat state_dict inside common checkpoint wrappers, `module.` prefixes removed."""
  if not isinstance(obj, Mapping):
    raise WeightsFileError(f'The file holds a {type(obj).__name__}, not a state_dict (a dict of '
                           'named arrays or tensors).')
  while isinstance(obj, Mapping) and not any(hasattr(v, 'shape') for v in obj.values()):
    inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)),
                 None)
    if inner is None:
      raise StateDictMismatchError(
          f'Could not find a state_dict in the checkpoint: its top-level keys are '
          f'{sorted(obj)[:20]}; expected tensors or one of {_WRAPPER_KEYS}.')
    obj = inner
  sd = dict(obj)
  if sd and all(k.startswith('module.') for k in sd):  # DataParallel / DDP
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return sd


def load_torch_file(path: str | os.PathLike) -> dict[str, Any]:
  """Returns the state_dict stored in a `.pt`/`.pth` file (needs PyTorch installed)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading the PyTorch file {path} needs PyTorch: pip install torch') from e
  if not os.path.exists(path):
    raise FileNotFoundError(f'PyTorch checkpoint {path} does not exist.')
  check_weights_path(path, 'PyTorch weights (.pt/.pth)')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise unreadable(path, 'PyTorch weights (.pt/.pth)', e) from None
  try:
    return unwrap_state_dict(obj)
  except (WeightsFileError, StateDictMismatchError) as e:  # named by the file
    raise type(e)(f'{path}: {e}') from None


def _flax_leaf(name: str, value: np.ndarray) -> tuple[str, str, np.ndarray] | None:
  """Returns (collection, leaf name, converted array) for one PyTorch leaf, or None to drop."""
  if name == 'num_batches_tracked':
    return None
  if name == 'running_mean':
    return 'batch_stats', 'mean', value
  if name == 'running_var':
    return 'batch_stats', 'var', value
  if name == 'bias':
    return 'params', 'bias', value
  if name == 'weight':
    if value.ndim == 4:
      return 'params', 'kernel', value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return 'params', 'kernel', value.T
    if value.ndim == 1:
      return 'params', 'scale', value
  raise StateDictMismatchError(f'Do not know how to convert a leaf named {name!r} with shape '
                               f'{value.shape}.')


def torch_to_flax(state_dict: Mapping[str, Any], template: Mapping[str, Any], *,
                  rename: Callable[[str], str | None] | None = None,
                  prefix: str = '', strict: bool = True) -> dict[str, Any]:
  """Returns Flax variables shaped like `template`, filled from a PyTorch `state_dict`.

  Args:
    state_dict: PyTorch tensors or numpy arrays by dotted key (wrappers are unwrapped).
    template: the Flax variables ({'params': ..., 'batch_stats': ...}) to fill; arrays or
      `jax.ShapeDtypeStruct`s. Its dtypes are kept.
    rename: optional map applied to each PyTorch key before the naming rule; return None to
      drop a key (for a layout whose names differ from ours).
    prefix: Flax module path (slash-separated) that the state_dict's modules live under, e.g.
      'student' to load a plain backbone state_dict into a ReviewKD student.
    strict: if False, template leaves absent from the state_dict keep their template values
      (requires concrete arrays) instead of raising.
  Raises:
    StateDictMismatchError: naming the missing, unexpected and mis-shaped keys.
  """
  sd = unwrap_state_dict(state_dict)
  flat_template = traverse_util.flatten_dict(dict(template))
  out: dict[tuple[str, ...], Any] = {}
  unexpected, misshaped = [], []
  misshaped_paths = set()
  pre = tuple(p for p in prefix.split('/') if p)
  for key, value in sd.items():
    new_key = rename(key) if rename else key
    if new_key is None:
      continue
    mod, _, leaf_name = new_key.rpartition('.')
    converted = _flax_leaf(leaf_name, _to_numpy(value))
    if converted is None:
      continue
    collection, leaf, array = converted
    path = (collection, *pre, *module_path(mod), leaf)
    if path not in flat_template:
      unexpected.append(f'{key} (-> {"/".join(path)})')
      continue
    want = tuple(flat_template[path].shape)
    if tuple(array.shape) != want:
      misshaped.append(f'{key}: file has {tuple(value.shape)}, model wants '
                       f'{want} as {"/".join(path)}')
      misshaped_paths.add(path)
      continue
    out[path] = array.astype(flat_template[path].dtype)
  missing = ['/'.join(p) for p in flat_template if p not in out and p not in misshaped_paths]
  if not strict:
    for p in flat_template:
      if p not in out:
        out[p] = flat_template[p]
    missing = []
  if missing or unexpected or misshaped:
    parts = ['The PyTorch state_dict does not fit this model.']
    for title, items in (('Missing from the file', missing), ('Unexpected in the file',
                                                              unexpected),
                         ('Wrong shape', misshaped)):
      if items:
        shown = '\n    '.join(items[:25])
        more = f'\n    ... and {len(items) - 25} more' if len(items) > 25 else ''
        parts.append(f'  {title} ({len(items)}):\n    {shown}{more}')
    parts.append('Check that the checkpoint was trained for this architecture and number of '
                 'classes (and for a ReviewKD student, whether keys start with "student.").')
    raise StateDictMismatchError('\n'.join(parts))
  return traverse_util.unflatten_dict(out)


def flax_to_torch(variables: Mapping[str, Any], *, prefix: str = '') -> dict[str, np.ndarray]:
  """Returns a PyTorch-layout state_dict (numpy arrays) of Flax variables; the inverse map.

  Module names are split back into PyTorch's dotted form (`layer1_0` -> `layer1.0`).
  `num_batches_tracked` is not produced.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  pre = tuple(p for p in prefix.split('/') if p)
  out = {}
  for path, value in flat.items():
    collection, *mods, leaf = path
    if pre and tuple(mods[:len(pre)]) != pre:
      continue
    mods = mods[len(pre):]
    value = np.asarray(value)
    if collection == 'batch_stats':
      name = {'mean': 'running_mean', 'var': 'running_var'}[leaf]
    elif leaf == 'kernel':
      name = 'weight'
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    elif leaf == 'scale':
      name = 'weight'
    else:
      name = leaf
    dotted = '.'.join(re.sub(r'_(\d+)(?=_|$)', r'.\1', m) for m in mods)
    out[f'{dotted}.{name}'] = value
  return out
