"""Orbax checkpoints of a run, and the labelled models it exports.

Layout of a workdir:

  checkpoints/<step>/{state,meta}   the TrainState for resuming (the last `keep` saves)
  best/<step>/{variables,meta}      the student backbone with the best eval top-1
  final/<step>/{variables,meta}     the student backbone after the last epoch

`best` and `final` hold the plain backbone's variables ({'params', 'batch_stats'}): what a
later run loads as its teacher. Their `meta` says what they are (label, model, dataset,
epoch, accuracy, and on which split "best" was chosen). Teachers are never saved here.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

STATE_DIR = 'checkpoints'
BEST, FINAL = 'best', 'final'
MODEL_LABELS = (BEST, FINAL)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model it is loaded into."""


def _manager(directory: epath.Path, arrays: str, keep: int | None,
             create: bool = True) -> ocp.CheckpointManager:
  """Returns a manager of two items: a pytree of arrays named `arrays`, and JSON `meta`."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep else None,
      enable_async_checkpointing=False, create=create)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={arrays: ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def abstract_like(tree: Any) -> Any:
  """Returns ShapeDtypeStructs (with shardings) of the arrays of `tree`, for restoring."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


class RunCheckpoints:
  """Saves and restores one run's TrainState and its labelled best/final models."""

  def __init__(self, workdir: str, *, keep: int):
    root = epath.Path(workdir)
    self.state_dir = root / STATE_DIR
    self._state = _manager(self.state_dir, 'state', keep)
    self._models = {label: _manager(root / label, 'variables', 1)
                    for label in MODEL_LABELS}

  def latest_step(self) -> int | None:
    """Returns the step of the newest TrainState checkpoint, or None."""
    return self._state.latest_step()

  def restore(self, like_state: Any) -> tuple[Any, dict]:
    """Returns (TrainState, meta) of the newest checkpoint, laid out like `like_state`."""
    step = self._state.latest_step()
    restored = self._state.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(like_state)),
        meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves the TrainState at `step` (blocking: the next step may donate its buffers)."""
    self._state.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._state.wait_until_finished()

  def save_model(self, label: str, step: int, variables: Any, meta: dict) -> None:
    """Saves a labelled model (`best` or `final`), replacing the previous one."""
    mngr = self._models[label]
    mngr.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        meta=ocp.args.JsonSave({'label': label, **meta})), force=True)
    mngr.wait_until_finished()

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
  best checkpoints; name `<workdir>/final` for the last one) or a `best`/`final` folder.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'No checkpoint at {path}.')
  if (p / BEST).exists():
    return p / BEST
  if any(c.name.isdigit() for c in p.iterdir()):
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
  by shapes) than the one it is loaded into.
  """
  directory = model_directory(path)
  mngr = _manager(directory, 'variables', None, create=False)  # only ever read here
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
    variables = mngr.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract)))['variables']
  finally:
    mngr.close()
  return variables, meta
