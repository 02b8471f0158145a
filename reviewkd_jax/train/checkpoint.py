"""Orbax checkpoints of a run, and the labelled models it exports.

Layout of a workdir:

  checkpoints/<step>/{state,meta}   the TrainState for resuming (the last `keep` saves)
  best/<step>/{variables,meta}      the student backbone with the best eval top-1
  final/<step>/{variables,meta}     the student backbone after the last epoch
  damaged_checkpoints/<step>        checkpoints that could not be read, moved aside on resume

Resuming tries the newest TrainState first and falls back to older ones when it cannot be
read (missing or corrupt files, arrays that do not fit); the run's metadata is compared with
the config before any array is read, so a workdir of another experiment is refused untouched.

`best` and `final` hold the plain backbone's variables ({'params', 'batch_stats'}): what a
later run loads as its teacher. Their `meta` says what they are (label, model, dataset,
epoch, accuracy, and on which split "best" was chosen). Teachers are never saved here.

Every save records a CRC-32 of each array's bytes in its `meta` (`array_crc32`, computed
on the host from the arrays being saved); a restore recomputes them from what it read. A
TrainState whose arrays do not match is handled like one that cannot be read (moved aside,
the previous one used); a labelled model that does not match is refused when loaded.
Checkpoints written before checksums existed are read unchecked.
"""
from __future__ import annotations

import sys
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

STATE_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
BEST, FINAL = 'best', 'final'
MODEL_LABELS = (BEST, FINAL)
DIGESTS = 'array_crc32'   # the meta key of the arrays' checksums


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model it is loaded into."""


class NoUsableCheckpointError(RuntimeError):
  """A workdir has TrainState checkpoints, but none of them can be read."""


class OtherRunError(ValueError):
  """A workdir holds the checkpoints of another experiment."""


class DamagedModelError(ValueError):
  """A saved model's arrays do not match the checksums saved with them."""


def _host_bytes(x: Any) -> np.ndarray | None:
  """Returns the bytes of array `x` as a flat uint8 numpy array (C order), None for an array
  this process holds only a part of."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)  # typed PRNG keys: their uint32 data
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      return None
    x = x.addressable_data(0)
  a = np.ascontiguousarray(np.asarray(x))
  return a.reshape(-1).view(np.uint8)


def array_digests(tree: Any) -> dict[str, str]:
  """Returns {leaf path: CRC-32 (8 hex digits) of the leaf's bytes} for the arrays of `tree`.

  Leaves split over several processes (none in this project's replicated states) are left
  out.
  """
  digests = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    data = _host_bytes(leaf)
    if data is not None:
      digests[_path_name(path)] = f'{zlib.crc32(data):08x}'
  return digests


def _path_name(path: tuple) -> str:
  """Returns a leaf's path as 'params/conv1/kernel' (dict keys, attributes, indices)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def mismatched_arrays(tree: Any, meta: dict) -> list[str]:
  """Returns the leaf paths of `tree` whose bytes do not match the checksums in `meta` (none
  when `meta` has no checksums: a checkpoint saved before they were recorded)."""
  saved = meta.get(DIGESTS)
  if not saved:
    return []
  now = array_digests(tree)
  return sorted(k for k, digest in now.items() if saved.get(k, digest) != digest)


def _describe_mismatch(bad: list[str]) -> str:
  names = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
  return (f'{len(bad)} array(s) differ from the checksums saved with them: the files were '
          f'damaged after saving ({names})')


def _drop_late_callbacks_of_failed_reads() -> None:
  """Stops Python printing the harmless aftermath of a failed restore (or save).

  When orbax's restore or save fails, TensorStore reads still in flight later call back into the
  event loop orbax has closed, and Python prints each as an unraisable 'Event loop is
  closed' RuntimeError (hundreds of tracebacks). Those alone are dropped; any other
  unraisable exception still reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_callbacks', False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError) and
        str(unraisable.exc_value) == 'Event loop is closed'):
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


# Orbax's replica-parallel saving (its default off GPU) has each of an array's R replicas
# write 1/R of it, and slices the array on every device first: one small XLA program per
# array shape and device, compiled at a process's first save. For the small arrays of most
# models (a few KiB to a few MiB) those compiles cost more than the parallel writes save (on
# 8 devices, hundreds of programs), so an array whose slice would be under this size is
# written whole by one replica; larger arrays are still split over their replicas.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _arrays_handler() -> ocp.StandardCheckpointHandler:
  """orbax's StandardCheckpointHandler (same format, same arguments), with jax.Arrays split
  over their replicas only above `MIN_REPLICA_SLICE_BYTES` per replica.

  The handler's inner PyTreeCheckpointHandler is replaced by one built as the handler builds
  it but with its own type registry (orbax's StandardCheckpointHandler takes no registry; a
  subclass would not match orbax's StandardSave/StandardRestore arguments).
  """
  handler = ocp.StandardCheckpointHandler()
  types = ocp.type_handlers
  registry = types.create_type_handler_registry(
      (int, types.ScalarHandler()), (float, types.ScalarHandler()),
      (bytes, types.ScalarHandler()), (np.number, types.ScalarHandler()),
      (np.ndarray, types.NumpyHandler()), (str, types.StringHandler()),
      (jax.Array, types.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)))
  handler._impl = ocp.PyTreeCheckpointHandler(  # pylint: disable=protected-access
      save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry)
  return handler


def _manager(directory: epath.Path, arrays: str, keep: int | None) -> ocp.CheckpointManager:
  """Returns a manager of two items: a pytree of arrays named `arrays`, and JSON `meta`.

  It creates nothing on disk: `save` and `save_model` create their folder first.
  """
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep else None,
      enable_async_checkpointing=False, create=False)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={arrays: _arrays_handler(),
                     'meta': ocp.JsonCheckpointHandler()})


def abstract_like(tree: Any) -> Any:
  """Returns ShapeDtypeStructs (with shardings) of the arrays of `tree`, for restoring."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


class RunCheckpoints:
  """Saves and restores one run's TrainState and its labelled best/final models.

  Opening a workdir writes nothing; folders appear with the first save.
  """

  def __init__(self, workdir: str, *, keep: int):
    root = epath.Path(workdir)
    self.state_dir = root / STATE_DIR
    self.damaged_dir = root / DAMAGED_DIR
    self._keep = keep
    self._state = _manager(self.state_dir, 'state', keep)
    self._models = {label: _manager(root / label, 'variables', 1)
                    for label in MODEL_LABELS}
    # A failed write's threads call back after the failure surfaced: drop that aftermath from
    # the start (it can print before the error reaches this class).
    _drop_late_callbacks_of_failed_reads()

  def latest_step(self) -> int | None:
    """Returns the step of the newest TrainState checkpoint, or None."""
    return self._state.latest_step()

  def check_newest_meta(self, check_meta: Callable[[dict], None]) -> None:
    """Passes the `meta` of the newest checkpoint whose meta reads to `check_meta`, reading no
    array: what `restore_newest_usable` checks first, for a caller that refuses another
    experiment's workdir before it builds (and compiles) anything."""
    for step in sorted(self._state.all_steps(), reverse=True):
      try:
        meta = self._read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue  # restore_newest_usable reports it
      check_meta(meta)
      return

  def _read_meta(self, step: int) -> dict:
    return dict(self._state.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta'])

  def restore_newest_usable(self, like_state: Any, check_meta: Callable[[dict], None]
                            ) -> tuple[Any, dict] | None:
    """Returns (TrainState, meta) of the newest checkpoint that reads; None if there is none.

    Newest first: a checkpoint's `meta` is read and passed to `check_meta` before any array
    is (`check_meta` raises for a workdir of another experiment, which ends the search);
    then its arrays are restored like `like_state` and checked against the checksums in its
    `meta`. A checkpoint that cannot be read (missing or corrupt files, arrays that do not
    fit or do not match their checksums) is skipped; once a usable one is
    found, the skipped newer ones are moved aside to `damaged_checkpoints/` (never deleted),
    with a warning, so that training continues from the usable step. When none reads,
    raises NoUsableCheckpointError listing each step and why, having moved nothing.
    """
    tried = []
    for step in sorted(self._state.all_steps(), reverse=True):
      try:
        meta = self._read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        tried.append((step, f'its metadata does not read ({_first_line(e)})'))
        continue
      check_meta(meta)
      try:
        state = self._state.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(like_state))))['state']
      except Exception as e:  # pylint: disable=broad-except
        _drop_late_callbacks_of_failed_reads()
        tried.append((step, _first_line(e)))
        continue
      bad = mismatched_arrays(state, meta)
      if bad:
        tried.append((step, _describe_mismatch(bad)))
        continue
      if tried:
        self._move_aside(tried, usable=step)
      return state, meta
    if tried:
      raise NoUsableCheckpointError(
          f'No checkpoint in {self.state_dir} can be read, so the run cannot resume:\n' +
          '\n'.join(f'  step {s}: {why}' for s, why in tried) +
          f'\nNothing was moved or deleted. Restore the files, or move {self.state_dir} '
          'aside to start this run from scratch.')
    return None

  def _move_aside(self, damaged: list[tuple[int, str]], *, usable: int) -> None:
    """Moves the damaged step folders to `damaged_dir` (process 0) and reloads the list."""
    for step, why in damaged:
      target = self.damaged_dir / str(step)
      n = 1
      while target.exists():
        target, n = self.damaged_dir / f'{step}.{n}', n + 1
      logging.warning('The checkpoint of step %d cannot be read (%s); resuming from step %d '
                      'instead. Moved %s to %s.', step, why, usable,
                      self.state_dir / str(step), target)
      if jax.process_index() == 0:
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('reviewkd_jax: damaged checkpoints moved aside')
    self._state.close()
    self._state = _manager(self.state_dir, 'state', self._keep)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves the TrainState at `step` (blocking: the next step may donate its buffers)."""
    self.state_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, DIGESTS: array_digests(state)}
    try:
      self._state.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self._state.wait_until_finished()
    except BaseException:  # e.g. a full disk: writes in flight outlive orbax's event loop
      _drop_late_callbacks_of_failed_reads()
      raise

  def save_model(self, label: str, step: int, variables: Any, meta: dict) -> None:
    """Saves a labelled model (`best` or `final`), replacing the previous one."""
    mngr = self._models[label]
    epath.Path(mngr.directory).mkdir(parents=True, exist_ok=True)
    try:
      mngr.save(step, args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables),
          meta=ocp.args.JsonSave({'label': label, **meta, DIGESTS: array_digests(variables)})),
          force=True)
      mngr.wait_until_finished()
    except BaseException:
      _drop_late_callbacks_of_failed_reads()
      raise

  def model_meta(self, label: str) -> dict | None:
    """Returns the meta of the saved `label` model, or None if there is none yet."""
    mngr = self._models[label]
    step = mngr.latest_step()
    if step is None:
      return None
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def reached_preemption(self, step: int) -> bool:
    """Returns True when the cluster announced a preemption (multi-process runs)."""
    return self._state.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending writes and releases the managers."""
    for mngr in (self._state, *self._models.values()):
      mngr.wait_until_finished()
      mngr.close()


def model_directory(path: str) -> epath.Path:
  """Returns the labelled-model folder that `path` names.

  `path` is a run's workdir (its `best` model is used, as the authors' teachers are their
  best checkpoints, else its `final` one; name `<workdir>/final` for the last one) or a
  `best`/`final` folder.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'No checkpoint at {path}.')
  if (p / BEST).exists():
    return p / BEST
  if (p / FINAL).exists():  # a run that keeps no best model (detection)
    return p / FINAL
  if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
    return p
  raise FileNotFoundError(
      f'{path} holds no model saved by this project: expected a run workdir with a '
      f'"{BEST}" or "{FINAL}" folder, or one of those folders.')


def _compare(template: Any, stored: Any, path: str) -> None:
  want = {'/'.join(k): tuple(v.shape) for k, v in
          traverse_util.flatten_dict(dict(template)).items()}
  have = {'/'.join(k): tuple(v.shape) for k, v in
          traverse_util.flatten_dict(dict(stored)).items()}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = [f'{k}: checkpoint {have[k]}, model {want[k]}' for k in sorted(want)
               if k in have and have[k] != want[k]]
  if missing or unexpected or misshaped:
    parts = [f'The checkpoint at {path} does not fit the model.']
    for title, items in (('Missing from the checkpoint', missing),
                         ('Unexpected in the checkpoint', unexpected),
                         ('Wrong shape', misshaped)):
      if items:
        parts.append(f'  {title} ({len(items)}): ' + ', '.join(items[:20]) +
                     (' ...' if len(items) > 20 else ''))
    raise CheckpointMismatchError('\n'.join(parts))


def load_model(path: str, template: Any, *, sharding: jax.sharding.Sharding,
               expect_model: str | None = None) -> tuple[Any, dict]:
  """Returns (variables, meta) of a labelled model, checked against `template`'s shapes.

  Raises CheckpointMismatchError when the stored model is another architecture (by name or
  by shapes) than the one it is loaded into, DamagedModelError when its arrays do not match
  the checksums saved with them.
  """
  directory = model_directory(path)
  mngr = _manager(directory, 'variables', None)  # only ever read here
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'No saved model in {directory}.')
    meta = dict(mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta'])
    if expect_model and meta.get('model') != expect_model:
      raise CheckpointMismatchError(
          f'{directory} holds a {meta.get("model")!r} ({meta.get("dataset")}), but the model '
          f'to load is {expect_model!r}: point to a checkpoint of that network or change the '
          'model name.')
    _compare(template, mngr.item_metadata(step)['variables'], str(directory))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
    try:
      variables = mngr.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(abstract)))['variables']
    except Exception as e:  # pylint: disable=broad-except
      _drop_late_callbacks_of_failed_reads()
      raise DamagedModelError(
          f'The model saved in {directory / str(step)} cannot be read ({_first_line(e)}): '
          'restore that folder from a copy, or rerun the run that wrote it.') from e
    bad = mismatched_arrays(variables, meta)
    if bad:
      raise DamagedModelError(
          f'The model saved in {directory / str(step)} is damaged: {_describe_mismatch(bad)}. '
          'Restore that folder from a copy, or rerun the run that wrote it.')
  finally:
    mngr.close()
  return variables, meta
