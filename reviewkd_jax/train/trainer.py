"""`train_and_evaluate`: one run, from data and teacher to checkpoints and logs.

Read top to bottom: `_set_up` checks the config and prepares the run (`setup.build_run`),
the data, the resumed state and the frozen teacher without writing anything (a mistake is
one `SetupError`); `_train` evaluates the teacher, runs the loop (train steps; at epoch ends
evaluate, keep the best model, save) and exports the final model. Suites of runs (the
offline demo) are `train.suite`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import threading
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metric_writers
from etils import epath

from reviewkd_jax import data
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import progress
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import step as step_lib
from reviewkd_jax.train import teacher as teacher_lib

# A checkpoint is only resumed by a run that would replay the same steps: every config field
# is saved with it (`SETTINGS`) and must be equal on resume, except these, which change how a
# run logs, evaluates, checkpoints, where it stops and where it reads its files, not what it
# trains.
RESUMABLE_FIELDS = ('data_dir', 'prefetch_batches', 'eval_batch_size', 'eval_teacher',
                    'num_epochs', 'log_every_steps', 'eval_every_epochs',
                    'checkpoint_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
                    'stop_after_step')
SETTINGS = 'settings'  # the meta key of a checkpoint's config fields
# Checkpoints saved without `SETTINGS` are compared on these fields of their metadata, and
# the method's own `run_fields` (distill.base.Method).
_RESUME_KEYS = ('dataset', 'train_subset', 'model', 'method', 'teacher', 'batch_size',
                'steps_per_epoch', 'seed')


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
  """What a finished (or stopped) run hands back to a caller in Python."""
  workdir: str
  state: state_lib.TrainState
  step: int
  total_steps: int
  final: dict | None          # eval metrics of the final model (None if stopped early)
  best: dict | None           # eval metrics and epoch of the best model so far
  teacher: dict | None        # the teacher's eval metrics (None without a teacher)
  history: list[dict]         # the logged training metrics, one dict per logging point
  evals: list[dict] = dataclasses.field(default_factory=list)  # this call's evaluations


@dataclasses.dataclass
class _Progress:
  """What the loop keeps between steps besides the train state."""
  saved_step: int | None      # the step of the newest TrainState on disk
  best: dict | None           # {'top1', 'top5', 'epoch'} of the best model so far
  last_eval: dict | None      # the newest evaluation, with its 'epoch' and 'step'
  evals: list[dict] = dataclasses.field(default_factory=list)  # every one of this call


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
                        resumable: tuple[str, ...]) -> bool:
  """Raises OtherRunError, in one sentence naming each field, both values and what to do,
  when a checkpoint's saved `SETTINGS` differ from `settings`; returns False when the
  checkpoint saved none (it predates them: the caller compares what it has)."""
  stored = meta.get(SETTINGS)
  if stored is None:
    return False
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


@dataclasses.dataclass
class _Setup:
  """Everything `train_and_evaluate` prepares before it writes anything."""
  run: setup_lib.RunSetup
  pipeline: data.InputPipeline
  state: state_lib.TrainState
  resumed: bool
  ckpts: checkpoint_lib.RunCheckpoints
  run_meta: dict
  teacher_variables: Any
  teacher_source: str | None
  constants: Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> RunResult:
  """Trains and evaluates `config` in `workdir`, resuming from its newest usable checkpoint.

  `devices` (default: all devices of all processes) is the mesh; tests pass a subset.
  Raises SetupError for a run that cannot start (a config mistake, missing data or teacher,
  a workdir of another experiment, no readable checkpoint), before any work and before
  anything in the workdir is written.
  """
  try:
    setup = _set_up(config, workdir, devices)
  except (ValueError, FileNotFoundError, checkpoint_lib.NoUsableCheckpointError) as e:
    raise SetupError(str(e)) from e
  return run_in_workdir(workdir, setup.ckpts, lambda writer: _train(setup, workdir, writer))


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


def _set_up(config, workdir: str, devices) -> _Setup:
  """Checks the config and prepares the run, the data, the teacher and the resumed state,
  reading the workdir but writing nothing."""
  mesh = state_lib.make_mesh(devices)
  method = setup_lib.check_config(config, mesh)
  pipeline = data.create_input_pipeline(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  if method.uses_teacher and not config.teacher_checkpoint:
    raise ValueError(
        f'config.method={config.method!r} distils from a teacher: set '
        '--config.teacher_checkpoint=PATH, a .pt/.pth state_dict (torchvision\'s weights for '
        'ImageNet teachers) or the workdir of a baseline run of this trainer (e.g. of '
        'configs/cifar100_baseline.py:model=resnet56).')
  # This run's training-set size (train_subset, mock data), e.g. for CRD's memory bank.
  spec = dataclasses.replace(data.get_spec(config.dataset), num_train=pipeline.num_train)
  run = setup_lib.build_run(config, spec, mesh=mesh, steps_per_epoch=pipeline.steps_per_epoch)
  run_meta = {'dataset': config.dataset, 'train_subset': config.train_subset,
              'model': config.model, 'method': config.method,
              'teacher': config.teacher, 'batch_size': config.batch_size,
              'steps_per_epoch': run.steps_per_epoch, 'seed': config.seed,
              'num_classes': spec.num_classes,
              **{k: config[k] for k in run.method.run_fields},
              SETTINGS: trained_settings(config, RESUMABLE_FIELDS)}
  # The workdir: another experiment's is refused before any array is read.
  ckpts = checkpoint_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  try:
    state = run.init_state()
    resumed = ckpts.restore_newest_usable(
        state, check_meta=lambda meta: _check_same_run(meta, run_meta, run.method.run_fields,
                                                       workdir))
    # The frozen teacher, then the method's per-run constants (a method that cannot run on
    # this data, CRD without dataset indices, stops here).
    teacher_variables, teacher_source = None, None
    if run.teacher is not None:
      teacher_variables, teacher_source = teacher_lib.load_teacher(
          config.teacher_checkpoint, run.teacher, name=config.teacher, dataset=config.dataset,
          image_shape=spec.image_shape, mesh=mesh)
    constants = run.method.prepare(config, spec, teacher=run.teacher,
                                   teacher_variables=teacher_variables,
                                   train_labels=pipeline.source.train_labels)
  except BaseException:
    ckpts.close()
    raise
  return _Setup(run=run, pipeline=pipeline,
                state=state if resumed is None else resumed[0], resumed=resumed is not None,
                ckpts=ckpts, run_meta=run_meta, teacher_variables=teacher_variables,
                teacher_source=teacher_source, constants=constants)


def _check_same_run(meta: dict, run_meta: dict, run_fields: dict, workdir: str) -> None:
  """Raises OtherRunError unless a checkpoint's `meta` is of the run `run_meta` describes.

  `run_fields` are the method's own fields, with the value a checkpoint lacking one implies.
  """
  if check_same_settings(meta, run_meta[SETTINGS], workdir, RESUMABLE_FIELDS):
    if meta.get('steps_per_epoch') != run_meta['steps_per_epoch']:
      raise checkpoint_lib.OtherRunError(
          f'{workdir} holds the checkpoints of a run of {meta.get("steps_per_epoch")} steps per '
          f'epoch, this config makes {run_meta["steps_per_epoch"]} (another training set), '
          'which this config would not continue: use a new --workdir.')
    return
  stored = {k: meta.get(k, run_fields.get(k)) for k in (*_RESUME_KEYS, *run_fields)}
  changed = [f'{k}: {v!r} in the checkpoint, {run_meta[k]!r} in the config'
             for k, v in stored.items() if v != run_meta[k]]
  if changed:
    raise checkpoint_lib.OtherRunError(
        f'{workdir} holds the checkpoints of a different run ({"; ".join(changed)}), which '
        'this config would not continue: use a new --workdir, or the same settings.')


def _train(setup: _Setup, workdir: str, writer: metric_writers.MetricWriter) -> RunResult:
  run, pipeline, ckpts, run_meta = setup.run, setup.pipeline, setup.ckpts, setup.run_meta
  state, teacher_variables = setup.state, setup.teacher_variables
  config, spec, mesh = run.config, run.spec, run.mesh
  steps_per_epoch = run.steps_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  logging.info('%s on %s: %d train / %d eval examples, %d steps per epoch of %d, %d epochs, '
               '%d devices (%d processes), dtype %s.', config.model, config.dataset,
               pipeline.num_train, pipeline.num_eval, steps_per_epoch, config.batch_size,
               config.num_epochs, mesh.size, jax.process_count(), config.dtype)

  # A resumed run goes on from its checkpoint; a new one records its config.
  step = int(state.step)
  if setup.resumed:
    logging.info('Resumed from %s at step %d (epoch %d, batch %d of %d).', ckpts.state_dir,
                 step, step // steps_per_epoch, step % steps_per_epoch, steps_per_epoch)
  elif jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
    writer.write_hparams(flat_hparams(config))
  if spec.eval_split == 'test':
    logging.info('"best" is chosen on the eval split %r of %s, its test set (there is no '
                 'validation split; the authors report best test accuracy the same way). '
                 '"final" is the unbiased number.', spec.eval_split, spec.name)

  teacher_eval = None
  if run.teacher is not None and config.eval_teacher:
    teacher_eval = _evaluate_teacher(run, teacher_variables, setup.teacher_source, pipeline,
                                     writer, step)

  train_step = run.train_step(setup.constants)
  eval_step = run.eval_step()
  logger = progress.MetricLogger(
      writer, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      global_batch=config.batch_size, nonfinite_hint=lambda: last_good_hint(ckpts))
  best_meta = ckpts.model_meta(checkpoint_lib.BEST)
  book = _Progress(saved_step=ckpts.latest_step(), last_eval=None,
                   best=({'top1': best_meta['eval_top1'], 'top5': best_meta['eval_top5'],
                          'epoch': best_meta['epoch']} if best_meta else None))

  # The loop: whole epochs from the data pipeline, resumed mid-epoch where needed.
  stop_at = min(total_steps, config.stop_after_step or total_steps)
  batch_sharding = state_lib.batch_sharded(mesh)
  with StopSignal() as stop_signal:
    while step < stop_at:
      epoch, offset = divmod(step, steps_per_epoch)
      count = min(steps_per_epoch, stop_at - epoch * steps_per_epoch) - offset
      batches = data.to_global_arrays(
          itertools.islice(pipeline.train_batches(epoch, offset), count), batch_sharding,
          prefetch=config.prefetch_batches)
      for batch in batches:
        state, metrics = train_step(state, batch, teacher_variables)
        step += 1
        logger.add(metrics)
        if step % config.log_every_steps == 0:
          logger.flush(step)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          _save(ckpts, logger, book, state, step, run_meta)
        if stop_signal.requested or ckpts.reached_preemption(step):
          _save(ckpts, logger, book, state, step, run_meta)
          logging.warning('Stopped for preemption at step %d; rerun with the same --workdir '
                          'to resume.', step)
          return RunResult(workdir, state, step, total_steps, None, book.best, teacher_eval,
                           logger.history, book.evals)
      if step % steps_per_epoch == 0:
        epochs_done = step // steps_per_epoch
        if epochs_done % config.eval_every_epochs == 0 or step == total_steps:
          _evaluate_and_keep_best(run, eval_step, state, step, pipeline, ckpts, writer,
                                  logger, book, run_meta)
        if epochs_done % config.checkpoint_every_epochs == 0 or step == total_steps:
          _save(ckpts, logger, book, state, step, run_meta)
  _save(ckpts, logger, book, state, step, run_meta)  # the state on disk is the one returned

  # The final model, once the last epoch is done.
  final = None
  if step == total_steps:
    final = _final_model(run, eval_step, state, step, pipeline, ckpts, writer, logger, book,
                         run_meta)
    logging.info('Done: final top-1 %.2f%% (%s/final), best %.2f%% at epoch %d (%s/best, '
                 'chosen on %r).', final['top1'], workdir, book.best['top1'],
                 book.best['epoch'], workdir, spec.eval_split)
  else:
    logging.info('Stopped at step %d of %d (config.stop_after_step); rerun with the same '
                 '--workdir to continue.', step, total_steps)
  return RunResult(workdir, state, step, total_steps, final, book.best, teacher_eval,
                   logger.history, book.evals)


def _evaluate_teacher(run, teacher_variables, source, pipeline, writer, step) -> dict:
  """Returns the frozen teacher's eval metrics (BN in eval mode), logged and written."""
  config = run.config
  metrics = step_lib.evaluate(run.eval_step(run.teacher), teacher_variables, pipeline,
                              run.mesh, prefetch=config.prefetch_batches)
  logging.info('Teacher %s from %s: top-1 %.2f%%, top-5 %.2f%% on %s %r (%d images, BN in '
               'eval mode).', config.teacher, source, metrics['top1'], metrics['top5'],
               config.dataset, run.spec.eval_split, metrics['count'])
  writer.write_scalars(step, {'teacher/top1': metrics['top1'],
                              'teacher/top5': metrics['top5']})
  return metrics


def last_good_hint(ckpts: checkpoint_lib.RunCheckpoints) -> str:
  latest = ckpts.latest_step()
  return (f'The last good checkpoint (step {latest}) in {ckpts.state_dir} is intact; rerun '
          'with the same --workdir to resume from it (other settings, such as a lower '
          'learning rate, train in a new --workdir).'
          if latest is not None else 'No checkpoint had been saved yet.')


def _save(ckpts, logger, book: _Progress, state, step: int, run_meta: dict) -> None:
  """Saves the TrainState at `step` unless it is on disk already."""
  logger.flush(step)  # never checkpoint a state that produced a non-finite loss
  if book.saved_step != step:
    with logger.paused('checkpoint'):
      ckpts.save(step, state, {**run_meta, 'step': step,
                               'epoch': step / run_meta['steps_per_epoch']})
    book.saved_step = step


def _evaluate_and_keep_best(run, eval_step, state, step, pipeline, ckpts, writer, logger,
                            book: _Progress, run_meta: dict) -> None:
  """Evaluates the backbone; exports it as `best` if its top-1 is the highest so far."""
  config, spec = run.config, run.spec
  epoch = step // run.steps_per_epoch
  with logger.paused('eval'):
    metrics = step_lib.evaluate(eval_step, run.backbone_variables(state), pipeline, run.mesh,
                                prefetch=config.prefetch_batches)
    book.last_eval = {**metrics, 'epoch': epoch, 'step': step}
    book.evals.append(book.last_eval)
    if book.best is None or metrics['top1'] > book.best['top1']:
      book.best = {'top1': metrics['top1'], 'top5': metrics['top5'], 'epoch': epoch}
      ckpts.save_model(checkpoint_lib.BEST, step, run.backbone_variables(state), {
          **run_meta, 'step': step, 'epoch': epoch, 'eval_top1': metrics['top1'],
          'eval_top5': metrics['top5'], 'eval_split': spec.eval_split,
          'chosen_on': f'highest top-1 on the eval split {spec.eval_split!r} of '
                       f'{spec.name}, evaluated every {config.eval_every_epochs} epoch(s)'})
  writer.write_scalars(step, {'eval/top1': metrics['top1'], 'eval/top5': metrics['top5'],
                              'eval/loss': metrics['loss'], 'eval/best_top1': book.best['top1']})
  logging.info('epoch %d/%d: eval top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d images); best '
               'top-1 %.2f%% at epoch %d', epoch, config.num_epochs, metrics['top1'],
               metrics['top5'], metrics['loss'], metrics['count'], book.best['top1'],
               book.best['epoch'])


def _final_model(run, eval_step, state, step, pipeline, ckpts, writer, logger,
                 book: _Progress, run_meta: dict) -> dict:
  """Returns the final model's eval metrics, exporting it as `final` unless a rerun of a
  finished run finds it on disk already."""
  final_meta = ckpts.model_meta(checkpoint_lib.FINAL)
  if final_meta and final_meta['step'] == step and book.last_eval is None:
    return {'top1': final_meta['eval_top1'], 'top5': final_meta['eval_top5'],
            'epoch': final_meta['epoch']}
  if book.last_eval is None or book.last_eval['step'] != step:
    _evaluate_and_keep_best(run, eval_step, state, step, pipeline, ckpts, writer, logger,
                            book, run_meta)
  final = book.last_eval
  ckpts.save_model(checkpoint_lib.FINAL, step, run.backbone_variables(state), {
      **run_meta, 'step': step, 'epoch': run.config.num_epochs, 'eval_top1': final['top1'],
      'eval_top5': final['top5'], 'eval_split': run.spec.eval_split})
  return final
