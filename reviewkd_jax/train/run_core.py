"""What every run shares, whatever its task: the workdir, the resume check, the records.

- `start_run`: a run's set-up (reading, never writing) with its mistakes as one `SetupError`,
  then its body with the workdir created and a metric writer open (`run_in_workdir`);
- the same-run check: a checkpoint is resumed only by a config that agrees with its saved
  settings (`trained_settings`, `check_same_run`), in one sentence naming what differs;
- `record_config` (config.json and TensorBoard hparams), `finished_model_meta` (a rerun of a
  finished run), `check_counts` and `check_batch_divides`;
- `read_renamed_fields` (a field's former name, read for one release);
- `StopSignal` (SIGTERM), `RunResult`, `is_stopped`, `EXIT_STOPPED`, `storage_fault`.

Imports no task: the classification run (`trainer`) and the detection run (`detection`)
both build on it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import threading
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import ml_collections
from absl import logging
from etils import epath

from reviewkd_jax.lazy_imports import metric_writers
from reviewkd_jax.train import checkpoint as checkpoint_lib

SETTINGS = 'settings'  # the meta key of a checkpoint's config fields
# What a run's set-up raises for a mistake the user can fix (config, data, weights, workdir).
SETUP_ERRORS = (ValueError, FileNotFoundError, checkpoint_lib.NoUsableCheckpointError)

# The exit code of main.py for a run (or suite) stopped before its end with a checkpoint saved
# (SIGTERM, a preemption notice, config.stop_after_step): rerunning resumes. EX_TEMPFAIL.
EXIT_STOPPED = 75


def is_stopped(result: Any) -> bool:
  """Returns True for a run's result (or a suite's {name: result}) stopped before its end."""
  if isinstance(result, dict):
    return any(is_stopped(r) for r in result.values())
  return result.final is None


# What a failed write says, wherever in the exception chain it is (OS, TensorFlow, TensorStore
# all quote the OS's words; their own codes such as RESOURCE_EXHAUSTED also mean device memory).
_STORAGE_FAULTS = (
    (('No space left on device', 'Disk quota exceeded'), 'the disk is full',
     'free some space'),
    (('Read-only file system', 'Permission denied'), 'the workdir cannot be written',
     'make it writable (or give another --workdir)'),
)


def storage_fault(error: BaseException, workdir: str) -> str | None:
  """Returns one message for a run that stopped because its workdir could not be written (disk
  full, no permission), saying what was kept, or None for any other error.

  A checkpoint or model folder left half-written by the failed save (orbax's
  `*.orbax-checkpoint-tmp*`) is removed: only complete saves remain.
  """
  seen, chain, e = set(), [], error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for texts, what, action in _STORAGE_FAULTS:
    hit = next((e for e in chain if any(t in str(e) for t in texts)), None)
    if hit is None:
      continue
    root = epath.Path(workdir)
    removed = []
    for folder in (checkpoint_lib.STATE_DIR, *checkpoint_lib.MODEL_LABELS):
      if (root / folder).is_dir():
        for partial in (root / folder).glob('*.orbax-checkpoint-tmp*'):
          try:
            partial.rmtree() if partial.is_dir() else partial.unlink()
            removed.append(partial.name)
          except OSError:
            pass
    steps = (sorted(int(p.name) for p in (root / checkpoint_lib.STATE_DIR).iterdir()
                    if p.name.isdigit()) if (root / checkpoint_lib.STATE_DIR).is_dir() else [])
    kept = (f'the checkpoints saved before are intact (newest: step {steps[-1]} in '
            f'{root / checkpoint_lib.STATE_DIR})' if steps else 'no checkpoint had been saved')
    cleaned = f', the half-written {", ".join(removed)} removed' if removed else ''
    reason = next(t for t in texts if t in str(hit))  # the OS's words where it gave them
    return (f'The run stopped because {what} ({reason}): {kept}{cleaned}. {action[0].upper()}'
            f'{action[1:]} and rerun with the same --workdir to resume.')
  return None


@dataclasses.dataclass
class RunResult:
  """What a finished (or stopped) run of either task hands back to a caller in Python."""
  workdir: str
  state: Any                  # the TrainState the run ended with
  step: int
  total_steps: int
  final: dict | None          # eval metrics of the final model (None if stopped early)
  history: list[dict]         # the logged training metrics, one dict per logging point
  evals: list[dict] = dataclasses.field(default_factory=list)  # this call's evaluations
  best: dict | None = None    # classification: eval metrics and epoch of the best model
  teacher: dict | None = None  # classification: the teacher's eval metrics, if evaluated


class StopSignal:
  """Turns SIGTERM (a single-host preemption notice) into a flag checked between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after this step, then stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
  """Returns the config as a flat {dotted name: scalar or str} dict (TensorBoard hparams)."""
  flat = {}

  def visit(prefix, value):
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

  visit('', config)
  return flat


def _json_value(value: Any) -> Any:
  """Returns `value` as JSON stores it (tuples as lists, ConfigDicts as dicts)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def trained_settings(config: ml_collections.ConfigDict, resumable: tuple[str, ...]) -> dict:
  """Returns {field: value as JSON stores it} of every config field not in `resumable`."""
  return {k: _json_value(v) for k, v in config.items() if k not in resumable}


def _shown(value: Any) -> str:
  """Returns a stored config value as the config file spells it (lists as tuples)."""
  def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v
  return repr(tuples(value))


def _override(field: str, value: Any) -> str:
  text = value if isinstance(value, str) else _shown(value)
  return f"--config.{field}='{text}'" if (' ' in text or not text) else f'--config.{field}={text}'


def check_same_settings(meta: dict, settings: dict, workdir: str,
                        resumable: tuple[str, ...],
                        renamed: Mapping[str, str] | None = None) -> bool:
  """Raises OtherRunError, in one sentence naming each field, both values and what to do,
  when a checkpoint's saved `SETTINGS` differ from `settings`; returns False when the
  checkpoint saved none (it predates them: the caller compares what it has).

  `renamed` ({former name: name}): a checkpoint saved before a field was renamed is compared
  under the field's new name.
  """
  stored = meta.get(SETTINGS)
  if stored is None:
    return False
  stored = dict(stored)
  for old, new in (renamed or {}).items():
    if old in stored and new not in stored:
      stored[new] = stored.pop(old)
  changed = sorted(k for k in settings.keys() & stored.keys() if settings[k] != stored[k])
  if changed:
    differences = '; '.join(f'{k}: {_shown(stored[k])} in the checkpoint, '
                            f'{_shown(settings[k])} in the config' for k in changed)
    overrides = ' '.join(_override(k, stored[k]) for k in changed)
    raise checkpoint_lib.OtherRunError(
        f'{workdir} holds the checkpoints of a different run ({differences}), which this '
        f'config would not continue: use a new --workdir, or resume with the checkpoint\'s '
        f'settings ({overrides}); only {", ".join(resumable)} may change on resume.')
  return True


class SetupError(ValueError):
  """A run cannot start as configured (config, data, teacher, workdir); the message says what
  to change. Raised before anything in the workdir is written."""


def check_workdir_can_be_made(workdir: str) -> None:
  """Raises SetupError, before any set-up work, if a local `workdir` cannot be created or
  written: the nearest existing path on the way to it is a file, or a folder without write
  permission. Reads only. Remote paths (gs://...) and what permissions cannot tell (a full
  disk, a read-only mount) are found when `run_in_workdir` creates the workdir."""
  if '://' in workdir:
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    reason = f'{path} is a file, not a folder'
  elif not os.access(path, os.W_OK | os.X_OK):
    reason = f'no permission to write in {path}'
  else:
    return
  raise SetupError(f'The workdir {workdir} cannot be written ({reason}): give a --workdir you '
                   'can write to.')


def run_in_workdir(workdir: str, ckpts: checkpoint_lib.RunCheckpoints, body):
  """Returns `body(writer)` run with the workdir created and a metric writer open (TensorBoard
  files from process 0; every process logs its progress lines), closing both afterwards.
  A workdir that cannot be created or written is a SetupError."""
  try:
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      probe = epath.Path(workdir) / f'.write_check_{jax.process_index()}'  # one per process
      probe.write_text('')
      probe.unlink(missing_ok=True)
    except Exception as e:  # pylint: disable=broad-except
      raise SetupError(f'The workdir {workdir} cannot be written ({str(e).strip()[:200]}): '
                       'give a --workdir you can write to.') from None
    writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])
              if jax.process_index() == 0 else metric_writers.MultiWriter([]))
    try:
      return body(writer)
    finally:
      writer.flush()
      writer.close()
  finally:
    ckpts.close()


def last_good_hint(ckpts: checkpoint_lib.RunCheckpoints) -> str:
  latest = ckpts.latest_step()
  return (f'The last good checkpoint (step {latest}) in {ckpts.state_dir} is intact; rerun '
          'with the same --workdir to resume from it (other settings, such as a lower '
          'learning rate, train in a new --workdir).'
          if latest is not None else 'No checkpoint had been saved yet.')


_Setup = TypeVar('_Setup')


def start_run(workdir: str, set_up: Callable[[], _Setup],
              body: Callable[[_Setup, metric_writers.MetricWriter], Any]):
  """Returns `body(setup, writer)` for `setup = set_up()`, in the workdir (`run_in_workdir`).

  `set_up` checks the config and reads the workdir without writing; what it raises of
  `SETUP_ERRORS` becomes one SetupError. The setup's `ckpts` (RunCheckpoints) are closed at
  the end.
  """
  check_workdir_can_be_made(workdir)
  try:
    setup = set_up()
  except SETUP_ERRORS as e:
    raise SetupError(str(e)) from e
  return run_in_workdir(workdir, setup.ckpts, lambda writer: body(setup, writer))


def check_same_run(meta: dict, run_meta: dict, workdir: str, resumable: Sequence[str],
                   legacy_keys: Sequence[str], implied: Mapping[str, Any] | None = None,
                   renamed: Mapping[str, str] | None = None) -> bool:
  """Raises OtherRunError unless a checkpoint's `meta` is of the run `run_meta` describes.

  Compares the saved settings (`check_same_settings`, returns True); a checkpoint saved
  without them is compared on `legacy_keys` and the fields of `implied`, whose values are
  what a checkpoint lacking the field implies (returns False). `renamed`: see
  `check_same_settings`.
  """
  if check_same_settings(meta, run_meta[SETTINGS], workdir, tuple(resumable), renamed):
    return True
  implied = implied or {}
  stored = {k: meta.get(k, implied.get(k)) for k in (*legacy_keys, *implied)}
  changed = [f'{k}: {v!r} in the checkpoint, {run_meta[k]!r} in the config'
             for k, v in stored.items() if v != run_meta[k]]
  if changed:
    raise checkpoint_lib.OtherRunError(
        f'{workdir} holds the checkpoints of a different run ({"; ".join(changed)}), which '
        'this config would not continue: use a new --workdir, or the same settings.')
  return False


def record_config(workdir: str, config: ml_collections.ConfigDict,
                  writer: metric_writers.MetricWriter) -> None:
  """Writes `config.json` and the TensorBoard hparams of a new run (process 0 only)."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
    writer.write_hparams(flat_hparams(config))


def finished_model_meta(ckpts: checkpoint_lib.RunCheckpoints, step: int,
                        metric: str) -> dict | None:
  """Returns the metadata of the `final` model on disk if a run already finished at `step`
  and evaluated it (`metric` recorded), else None: a rerun of a finished run reports it."""
  meta = ckpts.model_meta(checkpoint_lib.FINAL)
  if meta and meta['step'] == step and metric in meta:
    return meta
  return None


def check_counts(config: ml_collections.ConfigDict, *, at_least_one: tuple[str, ...],
                 at_least_zero: tuple[str, ...]) -> None:
  """Raises ValueError naming the first count field out of range, and a `train_subset` that
  does not make one batch."""
  for names, low in ((at_least_one, 1), (at_least_zero, 0)):
    for name in names:
      if config[name] < low:
        raise ValueError(f'config.{name} must be >= {low}, got {config[name]}.')
  if 0 < config.train_subset < config.batch_size:
    raise ValueError(f'config.train_subset={config.train_subset} is smaller than one batch '
                     f'(config.batch_size={config.batch_size}): no training step would run; '
                     'give at least one batch of examples, or 0 for the whole training set.')


def check_batch_divides(config: ml_collections.ConfigDict, num_devices: int,
                        names: Sequence[str] = ('batch_size', 'eval_batch_size')) -> None:
  """Raises ValueError for a global batch size the devices do not divide."""
  for name in names:
    if config[name] % num_devices:
      raise ValueError(f'config.{name}={config[name]} must be divisible by the number of '
                       f'devices ({num_devices}): it is the global batch, split over them.')


def read_renamed_fields(config: ml_collections.ConfigDict,
                        renamed: Mapping[str, str]) -> ml_collections.ConfigDict:
  """Returns `config` with the value of each set former field name ({former: name}) moved to
  its new name, with a one-line deprecation warning each; `config` itself is not changed.

  Raises ValueError when a config sets both names to different values.
  """
  used = [old for old in renamed if old in config and config[old]]
  if not used:
    return config
  config = copy.deepcopy(config)
  for old in used:
    new = renamed[old]
    if config[new] and config[new] != config[old]:
      raise ValueError(f'config.{old} (the former name of config.{new}) and config.{new} are '
                       f'both set, to different values: set config.{new} only.')
    logging.warning('config.%s is deprecated and will be removed in the next release: it is '
                    'read as config.%s; use that name.', old, new)
    config[new] = config[old]
    config[old] = type(config[old])()
  return config
