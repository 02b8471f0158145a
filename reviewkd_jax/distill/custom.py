"""ReviewKD between any two Flax modules, in the user's own training step.

    review = custom.ReviewKD(student, teacher,
                             student_outputs=['block1', 'block2', 'pool'],
                             teacher_outputs=['stage2', 'stage3', 'pool'],
                             example_input=jnp.zeros((1, 32, 32, 3)))
    abf_variables = review.init(jax.random.key(0))     # the trainable ABFs
    (logits, s_levels), s_state = review.apply_student(
        s_variables, x, train=True, mutable=['batch_stats'])
    _, t_levels = review.apply_teacher(t_variables, x, train=False)  # no gradient
    loss, abf_state = review.loss(abf_variables, s_levels, t_levels, train=True)

Outputs are named by module path (the `__call__` result of that submodule, as
`capture_intermediates` lists them) or by the path of a value the network sows into its
`'intermediates'` collection (`'block1/feat'` for `self.sow('intermediates', 'feat', x)` in
`block1`); nothing in the networks changes. Level i of the student is distilled from level
i of the teacher, shallow to deep. Each becomes an NHWC map (`models.imported.to_map`: maps
as they are, (N, C) vectors as 1x1 maps, ViT token sequences (N, T, C) reshaped to
(N, sqrt T, sqrt T, C) after dropping a class token when T - 1 is the square). The ABFs'
channels and sizes come from both networks' shapes (`jax.eval_shape`, nothing computed):
each ABF maps its student level to its teacher level's channels and size (PyTorch-nearest
resizing, any ratio), the ReviewKD chain fusing every level with the deeper ones, and HCL
(`losses.hcl`) compares them with the teacher's levels. A name that is not an output, an
output that cannot be a map, or level lists of different lengths stop at construction with
one `FeatureOutputError` naming the output and the shapes.

The head is `ReviewHead`, built from `reviewkd.ABF` (the paper's fusion block, deepest level
first, named `abfs_0`, `abfs_1`, ... as `reviewkd.ReviewKDStudent`'s); docs/custom.md has
the whole API.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax import losses
from reviewkd_jax.distill.reviewkd import ABF
from reviewkd_jax.models import imported
from reviewkd_jax.models.imported import FeatureOutputError

DISTANCES = {'hcl': losses.hcl, 'mse': losses.feature_mse}
FUSIONS = ('abf', 'sum')


class ReviewHead(nn.Module):
  """The ReviewKD fusion chain over student levels; returns one map per teacher level.

  Level j's output has teacher level j's channels and size. `abfs_0` is the deepest level;
  every other ABF fuses its level with the residual of the next deeper one (`reviewkd.ABF`).

  Attributes:
    teacher_channels: channels of each teacher level, shallow to deep.
    teacher_sizes: (H, W) of each teacher level, same order.
    mid_channels: ABF width; None: min(512, channels of the deepest student level), the
      authors' rule.
    fusion: 'abf' (attention, the paper's) or 'sum'.
  """
  teacher_channels: Sequence[int]
  teacher_sizes: Sequence[tuple[int, int]]
  mid_channels: int | None = None
  fusion: str = 'abf'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], *, train: bool) -> list[jax.Array]:
    if len(levels) != len(self.teacher_channels):
      raise ValueError(f'ReviewHead got {len(levels)} student levels for '
                       f'{len(self.teacher_channels)} teacher levels.')
    mid = self.mid_channels or min(512, levels[-1].shape[-1])
    fused: list[Any] = [None] * len(levels)
    residual = None
    for i, level in enumerate(reversed(range(len(levels)))):
      abf = ABF(mid, self.teacher_channels[level], fuse=i > 0, dtype=self.dtype,
                fusion=self.fusion, name=f'abfs_{i}')
      fused[level], residual = abf(levels[level], residual,
                                   out_size=tuple(self.teacher_sizes[level]), train=train)
    return fused


@dataclasses.dataclass(frozen=True)
class Level:
  """One named output: its path, the shape the network gives it and its NHWC map shape."""
  name: str
  shape: tuple[int, ...]
  map_shape: tuple[int, int, int, int]
  sown: bool


def _flatten_sown(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, list]:
  """Returns {'path/name': [values]} of an 'intermediates' collection (tuples of sown values)."""
  found = {}
  if isinstance(tree, tuple):
    return {imported.path_text(prefix): list(tree)}
  if hasattr(tree, 'items'):
    for key, value in tree.items():
      found.update(_flatten_sown(value, (*prefix, str(key))))
  return found


def _shape_only(value: Any) -> Any:
  return jax.ShapeDtypeStruct(value.shape, value.dtype) if imported.is_array(value) else value


def output_shapes(module: nn.Module, example_input: Any, kwargs: dict
                  ) -> tuple[dict[str, list], set[str]]:
  """Returns ({path: [ShapeDtypeStruct per call]}, paths only sown) of `module`'s outputs.

  Module outputs come first, in call order, then the sown values (a module output and a
  sown value of the same path: the module output). Shape inference only.
  """
  recorded: dict[str, list] = {}
  sown: dict[str, list] = {}
  x = jax.ShapeDtypeStruct(tuple(example_input.shape), example_input.dtype)

  def run(x):
    key = jax.random.key(0)
    calls: dict[str, list] = {}
    with imported.record_calls((), calls):
      _, variables = module.init_with_output({'params': key, 'dropout': key}, x, mutable=True,
                                             **kwargs)
    for path, values in calls.items():
      recorded[path] = [_shape_only(v) for v in values]
    for path, values in _flatten_sown(variables.get('intermediates', {})).items():
      sown[path] = [_shape_only(v) for v in values]

  jax.eval_shape(run, x)
  sown_only = {k: v for k, v in sown.items() if k not in recorded}
  return {**recorded, **sown_only}, set(sown_only)


def _levels(owner: str, module: nn.Module, names: tuple[str, ...], example_input: Any,
            kwargs: dict) -> list[Level]:
  outputs, sown_only = output_shapes(module, example_input, kwargs)
  levels = []
  for name in names:
    value = imported.pick(outputs, name, owner=owner)
    shape = tuple(int(d) for d in value.shape)
    levels.append(Level(name, shape, imported.map_shape(
        shape, name=name, owner=owner, batch=int(example_input.shape[0])),
                        name in sown_only))
  return levels


def _levels_text(levels: Sequence[Level]) -> str:
  return ', '.join(f'{l.name!r} {l.shape}' for l in levels)


def _with_intermediates(mutable: Any) -> Any:
  if mutable is True:
    return True
  if mutable is False or mutable is None:
    return ['intermediates']
  if isinstance(mutable, str):
    return [mutable, 'intermediates']
  return [*mutable, 'intermediates']


class ReviewKD:
  """ReviewKD of a student Flax module from a teacher Flax module (module docstring).

  Args:
    student, teacher: the two networks (any Flax modules, unchanged).
    student_outputs, teacher_outputs: names of their outputs, shallow to deep, as many for
      each (level i of the student is distilled from level i of the teacher).
    example_input: an array or `jax.ShapeDtypeStruct` shaped like one batch of input (only
      its shape and dtype are used).
    student_kwargs, teacher_kwargs: keyword arguments of the networks' `__call__` for the
      shape inference (e.g. `{'train': False}`).
    mid_channels, fusion, dtype: of the ABFs (`ReviewHead`).
    distance: 'hcl' (the paper's) or 'mse' (`losses.feature_mse`).

  Attributes:
    head: the trainable `ReviewHead` (its variables come from `init`).
    student_levels, teacher_levels: the `Level`s, shallow to deep.
  """

  def __init__(self, student: nn.Module, teacher: nn.Module, *,
               student_outputs: Sequence[str], teacher_outputs: Sequence[str],
               example_input: Any, student_kwargs: dict | None = None,
               teacher_kwargs: dict | None = None, mid_channels: int | None = None,
               fusion: str = 'abf', distance: str = 'hcl', dtype: Any = jnp.float32):
    if fusion not in FUSIONS:
      raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}.')
    if distance not in DISTANCES:
      raise ValueError(f'distance must be one of {tuple(DISTANCES)}, got {distance!r}.')
    self.student, self.teacher = student, teacher
    self.student_outputs = imported.check_names(student_outputs, 'student_outputs')
    self.teacher_outputs = imported.check_names(teacher_outputs, 'teacher_outputs')
    self._kwargs = {'student': dict(student_kwargs or {}), 'teacher': dict(teacher_kwargs or {})}
    self.student_levels = _levels('The student', student, self.student_outputs, example_input,
                                  self._kwargs['student'])
    self.teacher_levels = _levels('The teacher', teacher, self.teacher_outputs, example_input,
                                  self._kwargs['teacher'])
    ns, nt = len(self.student_levels), len(self.teacher_levels)
    if ns != nt:
      fewer = 'teacher' if nt < ns else 'student'
      raise FeatureOutputError(
          f'The {fewer} has fewer levels than the {"student" if fewer == "teacher" else "teacher"}'
          f': student {ns} ({_levels_text(self.student_levels)}), teacher {nt} '
          f'({_levels_text(self.teacher_levels)}). ReviewKD distils student level i from '
          'teacher level i: name as many outputs on each side.')
    self.distance = distance
    self.head = ReviewHead(
        teacher_channels=tuple(l.map_shape[3] for l in self.teacher_levels),
        teacher_sizes=tuple((l.map_shape[1], l.map_shape[2]) for l in self.teacher_levels),
        mid_channels=mid_channels, fusion=fusion, dtype=dtype)

  def summary(self) -> str:
    """Returns one line per level: student output -> its map -> the teacher output it learns."""
    lines = []
    for i, (s, t) in enumerate(zip(self.student_levels, self.teacher_levels)):
      lines.append(f'level {i}: student {s.name!r} {s.shape} as {s.map_shape} -> ABF -> '
                   f'teacher {t.name!r} {t.shape} as {t.map_shape}')
    return '\n'.join(lines)

  def init(self, rng: jax.Array) -> dict:
    """Returns the variables of the ABFs (`params`, `batch_stats`)."""
    shapes = [l.map_shape[1:] for l in self.student_levels]
    return jax.jit(lambda key: self.head.init(
        key, [jnp.zeros((1, *s), jnp.float32) for s in shapes], train=False))(rng)

  def _apply(self, side: str, variables: dict, args, kwargs, rngs, mutable):
    module = self.student if side == 'student' else self.teacher
    names = self.student_outputs if side == 'student' else self.teacher_outputs
    levels = self.student_levels if side == 'student' else self.teacher_levels
    owner = f'The {side}'
    needs_sown = any(l.sown for l in levels)
    variables = {k: v for k, v in variables.items() if k != 'intermediates'}
    mut = _with_intermediates(mutable) if needs_sown else mutable
    recorded: dict[str, list] = {}
    with imported.record_calls((), recorded):
      result = module.apply(variables, *args, rngs=rngs, mutable=mut, **kwargs)
    out, state = (result, None) if mut is False else result
    if needs_sown:
      state = dict(state)
      for path, values in _flatten_sown(state.pop('intermediates', {})).items():
        recorded.setdefault(path, values)
    maps = [imported.to_map(imported.pick(recorded, name, owner=owner), name=name,
                            owner=owner) for name in names]
    return out, maps, state

  def apply_student(self, variables: dict, *args, rngs: Any = None, mutable: Any = False,
                    **kwargs):
    """Runs the student as `student.apply(variables, *args, **kwargs)` would.

    Returns `(output, levels)`, `levels` the named outputs as NHWC maps (shallow to deep),
    or `((output, levels), updated collections)` when `mutable` is set, as Flax's `apply`.
    """
    out, maps, state = self._apply('student', variables, args, kwargs, rngs, mutable)
    return (out, maps) if mutable is False else ((out, maps), state)

  def apply_teacher(self, variables: dict, *args, rngs: Any = None, mutable: Any = False,
                    **kwargs):
    """`apply_student` for the teacher, its output and levels under `stop_gradient`."""
    out, maps, state = self._apply('teacher', variables, args, kwargs, rngs, mutable)
    out, maps = jax.lax.stop_gradient((out, maps))
    return (out, maps) if mutable is False else ((out, maps), state)

  def _check_student_levels(self, levels: Sequence[jax.Array]) -> None:
    if len(levels) != len(self.student_levels) or any(
        tuple(x.shape[1:]) != l.map_shape[1:] for x, l in zip(levels, self.student_levels)):
      got = ', '.join(str(tuple(x.shape)) for x in levels)
      want = ', '.join(f'{l.name!r} (N, {", ".join(map(str, l.map_shape[1:]))})'
                       for l in self.student_levels)
      raise FeatureOutputError(f'The ABFs were sized for the student levels {want}; got '
                               f'{len(levels)} levels shaped {got}. Pass the levels '
                               'apply_student returns.')

  def apply_head(self, head_variables: dict, student_levels: Sequence[jax.Array], *,
                 train: bool) -> tuple[list[jax.Array], dict]:
    """Returns (ABF outputs shaped like the teacher levels, the head's updated collections).

    `train=True` normalises with batch statistics and updates the running ones.
    """
    self._check_student_levels(student_levels)
    if train:
      fused, state = self.head.apply(head_variables, list(student_levels), train=True,
                                     mutable=['batch_stats'])
      return fused, dict(state)
    fused = self.head.apply(head_variables, list(student_levels), train=False)
    return fused, {k: v for k, v in head_variables.items() if k != 'params'}

  def loss(self, head_variables: dict, student_levels: Sequence[jax.Array],
           teacher_levels: Sequence[jax.Array], *, train: bool) -> tuple[jax.Array, dict]:
    """Returns (distance of the ABF outputs to the teacher levels, the head's collections).

    The distance is HCL summed over levels (or per-level MSE), float32, unweighted: the
    paper's loss is `CE + lambda * this`, with lambda warmed up over the first epochs
    (`distill.base.warmup_factor`). No gradient reaches the teacher levels.
    """
    fused, state = self.apply_head(head_variables, student_levels, train=train)
    targets = [jax.lax.stop_gradient(t) for t in teacher_levels]
    for f, t, l in zip(fused, targets, self.teacher_levels):
      if tuple(f.shape[1:]) != tuple(t.shape[1:]):
        raise FeatureOutputError(f'The teacher level {l.name!r} is shaped {tuple(t.shape)}, '
                                 f'the ABF output for it {tuple(f.shape)}: pass the levels '
                                 'apply_teacher returns.')
    return DISTANCES[self.distance](fused, targets), state
