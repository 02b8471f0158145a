"""Detector weights from torchvision, Detectron2 and ImageNet classification files.

One entry point, `load_detector_weights(path_or_state_dict, template, source='auto')`,
fills a detector's Flax variables from a torchvision detection state_dict, a Detectron2
model-zoo `.pkl` or `.pth` (also the ReviewKD authors' teacher+student checkpoints, `part`)
or an ImageNet classification state_dict (the backbone body only). Everything goes through
`convert.torch_to_flax` with a rename function per layout, so a file that does not fit raises
`StateDictMismatchError` naming its keys; the result (`LoadedWeights`) carries a `LoadReport`
of what was filled and left, and the input convention the file implies
(`implied_convention`). The layout rules (background row, fc1's input order, the deconv
kernel, input conventions) are in docs/detection.md (Module notes: weights.py).
"""
from __future__ import annotations

import math
import os
import pickle
import re
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from flax import traverse_util

from reviewkd_jax import convert
from reviewkd_jax.convert import StateDictMismatchError
from reviewkd_jax.detection import model as model_lib

SOURCES = ('torchvision', 'detectron2', 'imagenet')
_BODY = 'backbone.body.'


class LoadReport(NamedTuple):
  """What a load did. Paths are Flax module paths ('backbone/body/layer1_0/conv1')."""
  source: str
  filled: tuple[str, ...]        # modules whose every leaf came from the file
  left_at_init: tuple[str, ...]  # modules (partly) kept at the template's values
  dropped: tuple[str, ...]       # keys of the file that were deliberately not used
  convention: Any = None         # the input convention the file implies (None: not known)

  def __str__(self) -> str:
    lines = [f'Loaded {len(self.filled)} modules from a {self.source} file.']
    lines.append('Input convention of these weights: ' + (
        self.convention.describe() if self.convention is not None else
        'not implied by the file (set it in the detector config)'))
    if self.left_at_init:
      lines.append(f'Left at their initial values ({len(self.left_at_init)}): '
                   f'{_summarise(self.left_at_init)}')
    if self.dropped:
      lines.append(f'Not used from the file ({len(self.dropped)}): {_summarise(self.dropped)}')
    return '\n'.join(lines)


class LoadedWeights(NamedTuple):
  """`variables` (shaped like the template, numpy leaves) and the `report`."""
  variables: dict[str, Any]
  report: LoadReport

  @property
  def convention(self) -> model_lib.InputConvention | None:
    """The input convention the file implies (None when it does not tell: the ReviewKD
    authors' students)."""
    return self.report.convention


class InputConventionError(ValueError):
  """A detector config's input rules differ from those its weights were trained with."""


def implied_convention(state_dict: Mapping[str, Any], source: str,
                       part: str | None = None) -> model_lib.InputConvention | None:
  """Returns the input convention a file's weights were trained with, or None if unknown.

  Detectron2 files of bottleneck ResNets in Detectron2's own layout (the model zoo, the
  ReviewKD authors' teachers): MSRA's (BGR, std 1, stride_in_1x1), or the `pixel_mean` /
  `pixel_std` the file carries; torchvision detection and ImageNet files, and Detectron2
  files converted from torchvision (`stem.*`/`res2.*` keys): torchvision's. The authors'
  students (`part='student'`) and Detectron2 files of other bodies: None.
  """
  if source in ('torchvision', 'imagenet'):
    return model_lib.TORCHVISION_INPUT
  if part == 'student':
    return None
  keys = list(state_dict)
  if any(k.startswith(('stem.', 'res2.')) for k in keys):
    return model_lib.TORCHVISION_INPUT
  bottleneck = any(re.search(r'bottom_up\.res\d\.\d+\.conv3\.', k) for k in keys)
  if not bottleneck:
    return None
  mean, std = state_dict.get('pixel_mean'), state_dict.get('pixel_std')
  if mean is None:
    return model_lib.MSRA_INPUT
  mean = tuple(float(v) for v in np.asarray(mean).reshape(-1))
  std = (1.0, 1.0, 1.0) if std is None else tuple(float(v) for v in np.asarray(std).reshape(-1))
  fmt = 'RGB' if mean[0] > mean[2] else 'BGR'   # ImageNet's blue mean is the smallest
  return model_lib.InputConvention(True, fmt, mean, std)


def file_convention(path: str | os.PathLike, source: str = 'auto',
                    part: str | None = None) -> model_lib.InputConvention | None:
  """Returns `implied_convention` of the weights file at `path`."""
  sd, from_pkl = _read(path)
  if source == 'auto':
    source = 'detectron2' if from_pkl else detect_source(sd)
  return implied_convention(sd, source, part)


def check_convention(config: model_lib.DetectorConfig,
                     convention: model_lib.InputConvention | None, what: str) -> None:
  """Raises InputConventionError if `config`'s input rules differ from `convention`."""
  if convention is None:
    return
  have = config.input_convention
  same = {'stride_in_1x1': have.stride_in_1x1 == convention.stride_in_1x1,
          'input_format': have.input_format == convention.input_format,
          'pixel_mean': np.allclose(have.pixel_mean, convention.pixel_mean, atol=1e-3),
          'pixel_std': np.allclose(have.pixel_std, convention.pixel_std, atol=1e-3)}
  diff = [f'{name}={getattr(have, name)!r} (the weights: {getattr(convention, name)!r})'
          for name, ok in same.items() if not ok]
  if diff:
    raise InputConventionError(
        f'{what} were trained with {convention.describe()}, but the detector is configured '
        f'with {"; ".join(diff)}: build it with config.with_input_convention('
        'loaded.convention) (DetectorConfig.detectron2_msra for the Detectron2 model zoo).')


def _summarise(items, limit: int = 12) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... and {len(items) - limit} more' if len(items) > limit else '')


# ----------------------------------------------------------------------------- kernels


def deconv_kernel_from_torch(weight: np.ndarray, transpose_kernel: bool = False) -> np.ndarray:
  """Returns the Flax `ConvTranspose` kernel of a PyTorch ConvTranspose2d weight.

  `weight` is PyTorch's (in, out, kh, kw). For Flax's default `transpose_kernel=False` the
  kernel is (kh, kw, in, out) with both spatial axes flipped; for `transpose_kernel=True` it
  is (kh, kw, out, in), unflipped (lax flips and swaps it itself).
  """
  weight = np.asarray(weight)
  if transpose_kernel:
    return weight.transpose(2, 3, 1, 0)
  return weight.transpose(2, 3, 0, 1)[::-1, ::-1].copy()


def _deconv_value(weight: np.ndarray, transpose_kernel: bool) -> np.ndarray:
  """Returns a (A, B, kh, kw) array that `torch_to_flax`'s OIHW->HWIO rule turns into
  `deconv_kernel_from_torch(weight, transpose_kernel)`."""
  return deconv_kernel_from_torch(weight, transpose_kernel).transpose(3, 2, 0, 1)


def _fc1_value(weight: np.ndarray, channels: int, roi_flatten: str) -> np.ndarray:
  """Returns fc1's (out, C*P*P) weight with its columns in our flatten order."""
  if roi_flatten == 'chw':
    return weight
  if roi_flatten != 'hwc':
    raise ValueError(f"roi_flatten must be 'hwc' or 'chw', got {roi_flatten!r}")
  out, fan_in = weight.shape
  res = math.isqrt(fan_in // channels)
  if channels * res * res != fan_in:
    raise StateDictMismatchError(
        f'box_head fc1 has {fan_in} inputs, not C*P*P for the FPN width C={channels}')
  return weight.reshape(out, channels, res, res).transpose(0, 2, 3, 1).reshape(out, fan_in)


# ------------------------------------------------------------------------------ reading


def read_detectron2_pkl(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Returns the {name: array} of a Detectron2 model-zoo `.pkl` (pickle and numpy only)."""
  kind = 'Detectron2 model-zoo weights (.pkl)'
  convert.check_weights_path(path, kind)
  try:
    with open(path, 'rb') as f:
      obj = pickle.load(f, encoding='latin1')
  except Exception as e:  # pylint: disable=broad-except
    raise convert.unreadable(path, kind, e) from None
  if isinstance(obj, Mapping) and 'blobs' in obj and 'model' not in obj:
    raise StateDictMismatchError(
        f'{path} is a Detectron (v1) / Caffe2 blob file (key "blobs"); only Detectron2 '
        'model-zoo files ({"model": {name: array}}) are supported.')
  try:
    sd = convert.unwrap_state_dict(obj)
  except (convert.WeightsFileError, StateDictMismatchError) as e:  # named by the file
    raise type(e)(f'{path}: {e}') from None
  return {k: np.asarray(v) for k, v in sd.items()}


def _read(path_or_state_dict) -> tuple[dict[str, Any], bool]:
  """Returns (flat state_dict, came from a .pkl)."""
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    path = os.fspath(path_or_state_dict)
    if not os.path.exists(path):
      raise FileNotFoundError(f'Weights file {path} does not exist.')
    if path.endswith('.pkl'):
      return read_detectron2_pkl(path), True
    return convert.load_torch_file(path), False
  return convert.unwrap_state_dict(path_or_state_dict), False


def detect_source(state_dict: Mapping[str, Any]) -> str:
  """Returns 'torchvision', 'detectron2' or 'imagenet' from a state_dict's key names."""
  keys = list(state_dict)

  def any_starts(*prefixes):
    return any(k.startswith(prefixes) for k in keys)

  if any_starts('backbone.bottom_up.', 'proposal_generator.', 'roi_heads.box_head.fc1',
                'teacher.backbone.', 'stem.conv1.', 'res2.'):
    return 'detectron2'
  if any_starts('backbone.body.', 'backbone.fpn.inner_blocks', 'rpn.head.',
                'roi_heads.box_head.fc6'):
    return 'torchvision'
  if any_starts('conv1.', 'layer1.', 'features.'):
    return 'imagenet'
  raise StateDictMismatchError(
      f'Cannot tell the layout of this state_dict (first keys: {keys[:8]}); pass source= '
      f'one of {SOURCES}.')


# ------------------------------------------------------------------ MobileNetV2 layouts

# The tonylins MobileNetV2 (github.com/tonylins/pytorch-mobilenet-v2, the ReviewKD authors'
# Detectron2 student) numbers the layers of a block's flat `conv` Sequential; torchvision
# nests them: tonylins index -> torchvision suffix. Its final 1x1 conv is `conv.0`/`conv.1`.
_TONYLINS_T1 = {'0': '0.0', '1': '0.1', '3': '1', '4': '2'}
_TONYLINS_T6 = {'0': '0.0', '1': '0.1', '3': '1.0', '4': '1.1', '6': '2', '7': '3'}
_TONYLINS_KEY = re.compile(r'^(.*features\.)(\d+)\.conv\.(\d+)\.(\w+)$')


def _is_tonylins(keys) -> bool:
  return any(re.search(r'features\.\d+\.conv\.0\.weight$', k) for k in keys)


def _tonylins_to_torchvision(key: str) -> str:
  if key.startswith('conv.'):  # tonylins' last 1x1 conv (`self.conv`) is torchvision's features.18
    return f'features.18.{key[len("conv."):]}'
  m = _TONYLINS_KEY.match(key)
  if not m:
    return key
  head, block, index, leaf = m.groups()
  table = _TONYLINS_T1 if block == '1' else _TONYLINS_T6
  if index not in table:
    return key
  return f'{head}{block}.conv.{table[index]}.{leaf}'


# -------------------------------------------------------------------- rename functions

_TV_RULES = (
    (r'^backbone\.fpn\.inner_blocks\.(\d+)(\.0)?\.', lambda m: f'backbone.fpn.lateral_{int(m[1]) + 2}.'),
    (r'^backbone\.fpn\.layer_blocks\.(\d+)(\.0)?\.', lambda m: f'backbone.fpn.output_{int(m[1]) + 2}.'),
    (r'^rpn\.head\.conv(\.0\.0)?\.', lambda m: 'rpn.conv.'),
    (r'^rpn\.head\.cls_logits\.', lambda m: 'rpn.objectness.'),
    (r'^rpn\.head\.bbox_pred\.', lambda m: 'rpn.deltas.'),
    (r'^roi_heads\.box_head\.fc6\.', lambda m: 'box_head.fc1.'),
    (r'^roi_heads\.box_head\.fc7\.', lambda m: 'box_head.fc2.'),
    (r'^roi_heads\.box_predictor\.', lambda m: 'box_predictor.'),
    (r'^roi_heads\.mask_head\.(\d+)\.0\.', lambda m: f'mask_head.fcn{int(m[1]) + 1}.'),
    (r'^roi_heads\.mask_head\.mask_fcn(\d+)\.', lambda m: f'mask_head.fcn{m[1]}.'),
    (r'^roi_heads\.mask_predictor\.conv5_mask\.', lambda m: 'mask_head.deconv.'),
    (r'^roi_heads\.mask_predictor\.mask_fcn_logits\.', lambda m: 'mask_head.predictor.'),
)

_D2_RULES = (
    (r'^backbone\.bottom_up\.stem\.conv1\.norm\.', lambda m: f'{_BODY}bn1.'),
    (r'^backbone\.bottom_up\.stem\.conv1\.', lambda m: f'{_BODY}conv1.'),
    (r'^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.',
     lambda m: f'{_BODY}layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.'),
    (r'^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.',
     lambda m: f'{_BODY}layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.'),
    (r'^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.',
     lambda m: f'{_BODY}layer{int(m[1]) - 1}.{m[2]}.downsample.1.'),
    (r'^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.',
     lambda m: f'{_BODY}layer{int(m[1]) - 1}.{m[2]}.downsample.0.'),
    (r'^backbone\.bottom_up\.features\.', lambda m: f'{_BODY}features.'),
    (r'^backbone\.fpn_lateral(\d)\.', lambda m: f'backbone.fpn.lateral_{m[1]}.'),
    (r'^backbone\.fpn_output(\d)\.', lambda m: f'backbone.fpn.output_{m[1]}.'),
    (r'^proposal_generator\.rpn_head\.conv\.', lambda m: 'rpn.conv.'),
    (r'^proposal_generator\.rpn_head\.objectness_logits\.', lambda m: 'rpn.objectness.'),
    (r'^proposal_generator\.rpn_head\.anchor_deltas\.', lambda m: 'rpn.deltas.'),
    (r'^roi_heads\.box_head\.fc(\d)\.', lambda m: f'box_head.fc{m[1]}.'),
    (r'^roi_heads\.box_predictor\.', lambda m: 'box_predictor.'),
    (r'^roi_heads\.mask_head\.mask_fcn(\d)\.', lambda m: f'mask_head.fcn{m[1]}.'),
    (r'^roi_heads\.mask_head\.(deconv|predictor)\.', lambda m: f'mask_head.{m[1]}.'),
)
# Buffers of older Detectron2 checkpoints that are not weights.
_D2_DROP = re.compile(r'^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*)$')


def _apply_rules(rules, key: str) -> str:
  for pattern, repl in rules:
    new, n = re.subn(pattern, repl, key, count=1)
    if n:
      return new
  return key  # left as is: torch_to_flax reports it as unexpected


def torchvision_rename(key: str) -> str:
  """Returns our dotted name for a torchvision detection key (unknown keys unchanged)."""
  return _apply_rules(_TV_RULES, key)


def detectron2_rename(key: str) -> str:
  """Returns our dotted name for a Detectron2 key (unknown keys unchanged)."""
  return _apply_rules(_D2_RULES, key)


def imagenet_rename(key: str) -> str:
  """Returns our dotted name for a torchvision classification key (under backbone.body)."""
  return _BODY + key


# ----------------------------------------------------------------------- entry point


def _flat_template(template) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(template))


def _fpn_channels(flat_template) -> int:
  for path, leaf in flat_template.items():
    if path[-3:] == ('fpn', 'lateral_2', 'kernel'):
      return int(leaf.shape[-1])
  return 256


def _select_part(sd: dict[str, Any], part: str | None) -> tuple[dict[str, Any], list[str]]:
  """Splits the ReviewKD authors' teacher+student checkpoints; returns (sd, dropped keys)."""
  has_teacher = any(k.startswith('teacher.') for k in sd)
  if part is None:
    if has_teacher:
      raise StateDictMismatchError(
          "This checkpoint holds a teacher ('teacher.*' keys) and a student: pass "
          "part='teacher' or part='student'.")
    return sd, []
  if part == 'teacher':
    kept = {k[len('teacher.'):]: v for k, v in sd.items() if k.startswith('teacher.')}
    return kept, [k for k in sd if not k.startswith('teacher.')]
  if part == 'student':
    drop = [k for k in sd if k.startswith(('teacher.', 'kd_trans.'))]
    return {k: v for k, v in sd.items() if k not in set(drop)}, drop
  raise ValueError(f"part must be None, 'teacher' or 'student', got {part!r}")


def load_detector_weights(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                          template: Mapping[str, Any], source: str = 'auto', *,
                          partial: bool | None = None, part: str | None = None,
                          roi_flatten: str = 'hwc',
                          deconv_transpose_kernel: bool = False,
                          config: model_lib.DetectorConfig | None = None) -> LoadedWeights:
  """Returns the detector's variables filled from a torchvision/Detectron2/ImageNet file.

  Args:
    path_or_state_dict: a `.pkl` (Detectron2, read with pickle), a `.pth`/`.pt` (read with
      torch), or an in-memory state_dict (torch tensors or numpy arrays).
    template: the detector's Flax variables ({'params', 'batch_stats'}) with the pinned
      module names (see the module docstring); arrays or `jax.ShapeDtypeStruct`s. A template
      holding only some parts (e.g. only 'backbone') takes files holding only those parts.
    source: 'auto' (from the file name and key names), 'torchvision', 'detectron2' or
      'imagenet'.
    partial: whether template leaves that the file lacks may keep the template's values
      (then the template must hold arrays for them) and file parts whose top-level module
      (e.g. 'mask_head') the template lacks are skipped. Default: True for 'imagenet' and
      for `part='student'`, else False (every leaf must come from the file).
    part: for the ReviewKD authors' checkpoints holding `teacher.*` and a student:
      'teacher' or 'student'.
    roi_flatten: the order our box head flattens its (7, 7, C) RoI features in: 'hwc'
      (NHWC reshape, default) or 'chw'.
    deconv_transpose_kernel: the mask head's `ConvTranspose` uses `transpose_kernel=True`.
    config: the detector's config; its input convention (stride rule, channel order, pixel
      mean and std) is checked against the one the file implies.
  Raises:
    StateDictMismatchError: naming the missing, unexpected and mis-shaped keys.
    InputConventionError: `config`'s input rules are not those of the weights.
  """
  sd, from_pkl = _read(path_or_state_dict)
  if source == 'auto':
    source = 'detectron2' if from_pkl else detect_source(sd)
  if source not in SOURCES:
    raise ValueError(f"source must be 'auto' or one of {SOURCES}, got {source!r}")
  convention = implied_convention(sd, source, part)
  if config is not None:
    check_convention(config, convention, f'These {source} weights')
  sd, dropped = _select_part(sd, part)
  if partial is None:
    partial = source == 'imagenet' or part == 'student'
  flat_template = _flat_template(template)
  template_modules = {p[1] for p in flat_template if len(p) > 1}
  body_modules = {p[3] for p in flat_template if p[1:3] == ('backbone', 'body') and len(p) > 4}

  if source == 'torchvision':
    rename = torchvision_rename
  elif source == 'detectron2':
    if any(k.startswith(('stem.', 'res2.')) for k in sd):  # convert-torchvision-to-d2.py
      sd = {f'backbone.bottom_up.{k}': v for k, v in sd.items()}
    rename = detectron2_rename
  else:
    rename = imagenet_rename
  if _is_tonylins(sd):
    inner = rename
    rename = lambda k: inner(_tonylins_to_torchvision(k))  # noqa: E731

  channels = _fpn_channels(flat_template)
  converted: dict[str, Any] = {}
  for key, value in sd.items():
    new = rename(key)
    if source == 'detectron2' and _D2_DROP.match(key):
      dropped.append(key)
      continue
    if source == 'imagenet':
      module = new[len(_BODY):]
      if module.startswith(('fc.', 'classifier.')) or (
          module.startswith('features.18.') and 'features_18_0' not in body_modules):
        dropped.append(key)
        continue
    if partial and new.split('.', 1)[0] not in template_modules:
      dropped.append(key)
      continue
    converted[key] = _convert_value(new, value, source, channels, roi_flatten,
                                    deconv_transpose_kernel)

  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                    dict(template))
  out = convert.torch_to_flax(converted, abstract, rename=rename, strict=not partial)
  flat_out = traverse_util.flatten_dict(out)
  filled_leaves = {p for p, v in flat_out.items() if not isinstance(v, jax.ShapeDtypeStruct)}
  kept = [p for p in flat_out if p not in filled_leaves]
  abstract_kept = [p for p in kept if isinstance(flat_template[p], jax.ShapeDtypeStruct)]
  if abstract_kept:
    where = (f'{os.fspath(path_or_state_dict)}: '
             if isinstance(path_or_state_dict, (str, os.PathLike)) else '')
    what = ('an ImageNet classification backbone, not a detector' if source == 'imagenet' else
            'only part of a detector')
    raise StateDictMismatchError(
        f'{where}these {source} weights are {what}: they lack {len(abstract_kept)} of its '
        f'arrays ({_summarise(["/".join(p) for p in abstract_kept])}), and a load without '
        'initial values (a frozen teacher) has nothing to take those from. Give a whole '
        'detector: a Detectron2 model-zoo .pkl, a torchvision detection .pth, or the final/ '
        'folder of a run of this trainer. (A partial load needs concrete template values.)')
  for p in kept:
    flat_out[p] = np.asarray(flat_template[p])

  def module_of(path):
    return '/'.join(path[1:-1])

  partly_kept = sorted({module_of(p) for p in kept})
  filled = sorted({module_of(p) for p in filled_leaves} - set(partly_kept))
  report = LoadReport(source, tuple(filled), tuple(partly_kept), tuple(dropped),
                      convention)
  return LoadedWeights(traverse_util.unflatten_dict(flat_out), report)


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    value = value.float().numpy() if value.is_floating_point() else value.numpy()
  return np.asarray(value)


def _convert_value(new_key: str, value: Any, source: str, channels: int, roi_flatten: str,
                   deconv_transpose_kernel: bool) -> Any:
  """Returns `value` pre-transformed so that the generic leaf rule gives our layout."""
  module, _, leaf = new_key.rpartition('.')
  if module not in ('box_predictor.cls_score', 'box_predictor.bbox_pred', 'box_head.fc1',
                    'mask_head.deconv', 'mask_head.predictor'):
    return value
  a = _numpy(value)
  if module == 'box_head.fc1' and leaf == 'weight':
    return _fc1_value(a, channels, roi_flatten)
  if module == 'mask_head.deconv' and leaf == 'weight':
    return _deconv_value(a, deconv_transpose_kernel)
  if source != 'torchvision':
    return a
  # torchvision: background first -> last (cls_score), dropped (bbox_pred, mask predictor).
  if module == 'box_predictor.cls_score':
    return np.concatenate([a[1:], a[:1]], axis=0)
  if module == 'box_predictor.bbox_pred':
    return a[4:]
  if module == 'mask_head.predictor':
    return a[1:]
  return a
