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
from typing import Any

import jax
import ml_collections
from absl import logging

from reviewkd_jax import data
from reviewkd_jax.lazy_imports import metric_writers
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import progress
from reviewkd_jax.train import run_core
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import step as step_lib
from reviewkd_jax.train import teacher as teacher_lib
# Importable from here as before: the run core's names the classification run uses.
from reviewkd_jax.train.run_core import (EXIT_STOPPED, SETTINGS, RunResult, SetupError,  # noqa: F401
                                         StopSignal, check_same_settings, flat_hparams,
                                         is_stopped, last_good_hint, run_in_workdir,
                                         storage_fault, trained_settings)

# A checkpoint is only resumed by a run that would replay the same steps: every config field
# is saved with it (`SETTINGS`) and must be equal on resume, except these, which change how a
# run logs, evaluates, checkpoints, where it stops and where it reads its files, not what it
# trains.
RESUMABLE_FIELDS = ('data_dir', 'prefetch_batches', 'eval_batch_size', 'eval_teacher',
                    'num_epochs', 'log_every_steps', 'eval_every_epochs',
                    'checkpoint_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
                    'stop_after_step')
# Checkpoints saved without `SETTINGS` are compared on these fields of their metadata, and
# the method's own `run_fields` (distill.base.Method).
# Fields renamed, {former name: name}: a config setting the former is read for one release.
RENAMED_FIELDS = {'teacher_checkpoint': 'teacher_weights'}
_RESUME_KEYS = ('dataset', 'train_subset', 'model', 'method', 'teacher', 'batch_size',
                'steps_per_epoch', 'seed')


@dataclasses.dataclass
class _LoopRecord:
  """What the loop keeps between steps besides the train state."""
  saved_step: int | None      # the step of the newest TrainState on disk
  best: dict | None           # {'top1', 'top5', 'epoch'} of the best model so far
  last_eval: dict | None      # the newest evaluation, with its 'epoch' and 'step'
  evals: list[dict] = dataclasses.field(default_factory=list)  # every one of this call


@dataclasses.dataclass
class _Setup:
  """Everything `train_and_evaluate` prepares before it writes anything."""
  parts: setup_lib.RunSetup      # the run's method, modules, optimizer and jitted steps
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
  return run_core.start_run(workdir, lambda: _set_up(
      run_core.read_renamed_fields(config, RENAMED_FIELDS), workdir, devices),
                            lambda setup, writer: _train(setup, workdir, writer))


def _set_up(config, workdir: str, devices) -> _Setup:
  """Checks the config and prepares the run, the data, the teacher and the resumed state,
  reading the workdir but writing nothing."""
  mesh = state_lib.make_mesh(devices)
  method = setup_lib.check_config(config, mesh)
  # The frozen teacher first: weights that are missing, unreadable or of another network are
  # refused before the input pipeline is built and before anything is compiled.
  teacher_variables, teacher_source = None, None
  if method.uses_teacher and config.teacher_weights:
    dataset_spec = data.get_spec(config.dataset)
    _, teacher = method.build(config, dataset_spec, setup_lib.DTYPES[config.dtype])
    teacher_variables, teacher_source = teacher_lib.load_teacher(
        config.teacher_weights, teacher, name=config.teacher, dataset=config.dataset,
        image_shape=dataset_spec.image_shape, mesh=mesh)
  # Data that is not there is said before a teacher that is not set (a new user's first run).
  pipeline = data.create_input_pipeline(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  if method.uses_teacher and not config.teacher_weights:
    raise ValueError(
        f'config.method={config.method!r} distils from a teacher: set '
        '--config.teacher_weights=PATH, a .pt/.pth state_dict (torchvision\'s weights for '
        'ImageNet teachers) or the workdir of a baseline run of this trainer (e.g. of '
        'configs/cifar100_baseline.py:model=resnet56).')
  # This run's training-set size (train_subset, mock data), e.g. for CRD's memory bank.
  spec = dataclasses.replace(data.get_spec(config.dataset), num_train=pipeline.num_train)
  parts = setup_lib.build_run(config, spec, mesh=mesh, steps_per_epoch=pipeline.steps_per_epoch)
  run_meta = {'dataset': config.dataset, 'train_subset': config.train_subset,
              'model': config.model, 'method': config.method,
              'teacher': config.teacher, 'batch_size': config.batch_size,
              'steps_per_epoch': parts.steps_per_epoch, 'seed': config.seed,
              'num_classes': spec.num_classes,
              **{k: config[k] for k in parts.method.run_fields},
              SETTINGS: trained_settings(config, RESUMABLE_FIELDS)}
  # The workdir: another experiment's is refused before anything is compiled or read.
  check_meta = lambda meta: _check_same_run(  # pylint: disable=unnecessary-lambda-assignment
      meta, run_meta, parts.method.run_fields, workdir)
  ckpts = checkpoint_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  try:
    ckpts.check_newest_meta(check_meta)
    state = parts.init_state()
    resumed = ckpts.restore_newest_usable(state, check_meta=check_meta)
    # The method's per-run constants (a method that cannot run on this data, CRD without
    # dataset indices, stops here).
    constants = parts.method.prepare(config, spec, teacher=parts.teacher,
                                     teacher_variables=teacher_variables,
                                     train_labels=pipeline.source.train_labels)
  except BaseException:
    ckpts.close()
    raise
  return _Setup(parts=parts, pipeline=pipeline,
                state=state if resumed is None else resumed[0], resumed=resumed is not None,
                ckpts=ckpts, run_meta=run_meta, teacher_variables=teacher_variables,
                teacher_source=teacher_source, constants=constants)


def _check_same_run(meta: dict, run_meta: dict, run_fields: dict, workdir: str) -> None:
  """Raises OtherRunError unless a checkpoint's `meta` is of the run `run_meta` describes.

  `run_fields` are the method's own fields, with the value a checkpoint lacking one implies.
  """
  if run_core.check_same_run(meta, run_meta, workdir, RESUMABLE_FIELDS, _RESUME_KEYS,
                            implied=run_fields, renamed=RENAMED_FIELDS):
    if meta.get('steps_per_epoch') != run_meta['steps_per_epoch']:
      raise checkpoint_lib.OtherRunError(
          f'{workdir} holds the checkpoints of a run of {meta.get("steps_per_epoch")} steps per '
          f'epoch, this config makes {run_meta["steps_per_epoch"]} (another training set), '
          'which this config would not continue: use a new --workdir.')


def _train(setup: _Setup, workdir: str, writer: metric_writers.MetricWriter) -> RunResult:
  parts, pipeline, ckpts, run_meta = setup.parts, setup.pipeline, setup.ckpts, setup.run_meta
  state, teacher_variables = setup.state, setup.teacher_variables
  config, spec, mesh = parts.config, parts.spec, parts.mesh
  steps_per_epoch = parts.steps_per_epoch
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
  else:
    run_core.record_config(workdir, config, writer)
  if spec.eval_split == 'test':
    logging.info('"best" is chosen on the eval split %r of %s, its test set (there is no '
                 'validation split; the authors report best test accuracy the same way). '
                 '"final" is the unbiased number.', spec.eval_split, spec.name)

  teacher_eval = None
  if parts.teacher is not None and config.eval_teacher:
    teacher_eval = _evaluate_teacher(parts, teacher_variables, setup.teacher_source, pipeline,
                                     writer, step)

  train_step = parts.train_step(setup.constants)
  eval_step = parts.eval_step()
  logger = progress.MetricLogger(
      writer, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      global_batch=config.batch_size, nonfinite_hint=lambda: last_good_hint(ckpts))
  best_meta = ckpts.model_meta(checkpoint_lib.BEST)
  record = _LoopRecord(saved_step=ckpts.latest_step(), last_eval=None,
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
          _save(ckpts, logger, record, state, step, run_meta)
        if stop_signal.requested or ckpts.reached_preemption(step):
          _save(ckpts, logger, record, state, step, run_meta)
          logging.warning('Stopped for preemption at step %d; rerun with the same --workdir '
                          'to resume.', step)
          return RunResult(workdir, state, step, total_steps, None, logger.history,
                           record.evals, best=record.best, teacher=teacher_eval)
      if step % steps_per_epoch == 0:
        epochs_done = step // steps_per_epoch
        if epochs_done % config.eval_every_epochs == 0 or step == total_steps:
          _evaluate_and_keep_best(parts, eval_step, state, step, pipeline, ckpts, writer,
                                  logger, record, run_meta)
        if epochs_done % config.checkpoint_every_epochs == 0 or step == total_steps:
          _save(ckpts, logger, record, state, step, run_meta)
  _save(ckpts, logger, record, state, step, run_meta)  # the state on disk is the one returned

  # The final model, once the last epoch is done.
  final = None
  if step == total_steps:
    final = _final_model(parts, eval_step, state, step, pipeline, ckpts, writer, logger,
                         record, run_meta)
    logging.info('Done: final top-1 %.2f%% (%s/final), best %.2f%% at epoch %d (%s/best, '
                 'chosen on %r).', final['top1'], workdir, record.best['top1'],
                 record.best['epoch'], workdir, spec.eval_split)
  else:
    logging.info('Stopped at step %d of %d (config.stop_after_step); rerun with the same '
                 '--workdir to continue.', step, total_steps)
  return RunResult(workdir, state, step, total_steps, final, logger.history, record.evals,
                   best=record.best, teacher=teacher_eval)


def _evaluate_teacher(parts, teacher_variables, source, pipeline, writer, step) -> dict:
  """Returns the frozen teacher's eval metrics (BN in eval mode), logged and written."""
  config = parts.config
  metrics = step_lib.evaluate_classifier(parts.eval_step(parts.teacher), teacher_variables,
                                         pipeline, parts.mesh, prefetch=config.prefetch_batches)
  logging.info('Teacher %s from %s: top-1 %.2f%%, top-5 %.2f%% on %s %r (%d images, BN in '
               'eval mode).', config.teacher, source, metrics['top1'], metrics['top5'],
               config.dataset, parts.spec.eval_split, metrics['count'])
  writer.write_scalars(step, {'teacher/top1': metrics['top1'],
                              'teacher/top5': metrics['top5']})
  return metrics


def _save(ckpts, logger, record: _LoopRecord, state, step: int, run_meta: dict) -> None:
  """Saves the TrainState at `step` unless it is on disk already."""
  logger.flush(step)  # never checkpoint a state that produced a non-finite loss
  if record.saved_step != step:
    with logger.paused('checkpoint'):
      ckpts.save(step, state, {**run_meta, 'step': step,
                               'epoch': step / run_meta['steps_per_epoch']})
    record.saved_step = step


def _evaluate_and_keep_best(parts, eval_step, state, step, pipeline, ckpts, writer, logger,
                            record: _LoopRecord, run_meta: dict) -> None:
  """Evaluates the backbone; exports it as `best` if its top-1 is the highest so far."""
  config, spec = parts.config, parts.spec
  epoch = step // parts.steps_per_epoch
  with logger.paused('eval'):
    metrics = step_lib.evaluate_classifier(eval_step, parts.backbone_variables(state), pipeline,
                                           parts.mesh, prefetch=config.prefetch_batches)
    record.last_eval = {**metrics, 'epoch': epoch, 'step': step}
    record.evals.append(record.last_eval)
    if record.best is None or metrics['top1'] > record.best['top1']:
      record.best = {'top1': metrics['top1'], 'top5': metrics['top5'], 'epoch': epoch}
      ckpts.save_model(checkpoint_lib.BEST, step, parts.backbone_variables(state), {
          **run_meta, 'step': step, 'epoch': epoch, 'eval_top1': metrics['top1'],
          'eval_top5': metrics['top5'], 'eval_split': spec.eval_split,
          'chosen_on': f'highest top-1 on the eval split {spec.eval_split!r} of '
                       f'{spec.name}, evaluated every {config.eval_every_epochs} epoch(s)'})
  writer.write_scalars(step, {'eval/top1': metrics['top1'], 'eval/top5': metrics['top5'],
                              'eval/loss': metrics['loss'], 'eval/best_top1': record.best['top1']})
  logging.info('epoch %d/%d: eval top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d images); best '
               'top-1 %.2f%% at epoch %d', epoch, config.num_epochs, metrics['top1'],
               metrics['top5'], metrics['loss'], metrics['count'], record.best['top1'],
               record.best['epoch'])


def _final_model(parts, eval_step, state, step, pipeline, ckpts, writer, logger,
                 record: _LoopRecord, run_meta: dict) -> dict:
  """Returns the final model's eval metrics, exporting it as `final` unless a rerun of a
  finished run finds it on disk already."""
  final_meta = run_core.finished_model_meta(ckpts, step, 'eval_top1')
  if final_meta and record.last_eval is None:
    return {'top1': final_meta['eval_top1'], 'top5': final_meta['eval_top5'],
            'epoch': final_meta['epoch']}
  if record.last_eval is None or record.last_eval['step'] != step:
    _evaluate_and_keep_best(parts, eval_step, state, step, pipeline, ckpts, writer, logger,
                            record, run_meta)
  final = record.last_eval
  ckpts.save_model(checkpoint_lib.FINAL, step, parts.backbone_variables(state), {
      **run_meta, 'step': step, 'epoch': parts.config.num_epochs, 'eval_top1': final['top1'],
      'eval_top5': final['top5'], 'eval_split': parts.spec.eval_split})
  return final
