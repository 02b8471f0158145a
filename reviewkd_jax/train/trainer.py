"""`train_and_evaluate`: the whole run, from data and teacher to checkpoints and logs."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers
from etils import epath

from reviewkd_jax import data
from reviewkd_jax.models import create_model
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import methods as methods_lib
from reviewkd_jax.train import progress
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import step as step_lib
from reviewkd_jax.train import teacher as teacher_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# A checkpoint is only resumed by a run that would replay the same steps.
_RESUME_KEYS = ('dataset', 'train_subset', 'model', 'method', 'teacher', 'batch_size',
                'steps_per_epoch', 'seed')


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


def check_config(config: ml_collections.ConfigDict) -> methods_lib.Method:
  """Returns the config's method after checking names and combinations, before any work."""
  data.get_spec(config.dataset)
  method = methods_lib.get_method(config.method)
  create_model(config.model)  # raises the registry's ValueError for an unknown name
  method.check_config(config)
  if method.uses_teacher:
    if not config.teacher:
      raise ValueError(f'config.method={config.method!r} distils from a teacher: set '
                       '--config.teacher=NAME.')
    create_model(config.teacher)
  if config.teacher_bn_mode not in step_lib.TEACHER_BN_MODES:
    raise ValueError(f'config.teacher_bn_mode must be one of {step_lib.TEACHER_BN_MODES}, got '
                     f'{config.teacher_bn_mode!r}.')
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}.')
  if config.num_epochs < 1:
    raise ValueError(f'config.num_epochs must be >= 1, got {config.num_epochs}.')
  return method


class _StopSignal:
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


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
  flat = {}

  def visit(prefix, value):
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

  visit('', config)
  return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> RunResult | dict[str, RunResult]:
  """Trains and evaluates `config` in `workdir`, resuming from its latest checkpoint.

  A config with `runs` (and `run_order`) is a suite: each run trains in `workdir/<name>`,
  in order, and '{workdir}' in a run's `teacher_checkpoint` names the suite's workdir (so a
  run can distil from a teacher an earlier run trained). `devices` (default: all) is the
  mesh; tests pass a subset.
  """
  if 'runs' in config:
    return _train_suite(config, workdir, devices=devices)
  return _train_one(config, workdir, devices=devices)


def _train_suite(config, workdir: str, *, devices) -> dict[str, RunResult]:
  results = {}
  for name in config.run_order:
    run = copy.deepcopy(config.runs[name])
    run.teacher_checkpoint = run.teacher_checkpoint.replace('{workdir}', workdir)
    logging.info('=== %s: %s (method %s) in %s/%s', name, run.model, run.method, workdir, name)
    results[name] = _train_one(run, f'{workdir}/{name}', devices=devices)
  lines = [f'Results on {config.runs[config.run_order[0]].dataset} (eval split), '
           'final / best top-1:']
  summary = {}
  for name, result in results.items():
    run = config.runs[name]
    who = run.model + (f' + {run.method} from {run.teacher}' if run.method != 'none' else
                       ' alone')
    final = result.final['top1'] if result.final else float('nan')
    best = result.best['top1'] if result.best else float('nan')
    lines.append(f'  {name:<10} {who:<36} {final:6.2f}% / {best:6.2f}%')
    summary[name] = {'model': run.model, 'method': run.method, 'teacher': run.teacher,
                     'final_top1': final, 'best_top1': best}
  text = '\n'.join(lines)
  if jax.process_index() == 0:
    print(text, flush=True)
    (epath.Path(workdir) / 'summary.json').write_text(json.dumps(summary, indent=2))
  return results


def _train_one(config, workdir: str, *, devices) -> RunResult:
  method = check_config(config)
  mesh = state_lib.make_mesh(devices)
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % mesh.size:
      raise ValueError(f'config.{name}={config[name]} must be divisible by the number of '
                       f'devices ({mesh.size}).')
  is_main = jax.process_index() == 0
  pipeline = data.create_input_pipeline(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  # This run's training-set size (train_subset, mock data), e.g. for CRD's memory bank.
  spec = dataclasses.replace(data.get_spec(config.dataset), num_train=pipeline.num_train)
  if method.uses_teacher and not config.teacher_checkpoint:
    raise ValueError(
        f'config.method={config.method!r} distils from a teacher: set '
        '--config.teacher_checkpoint=PATH, a .pt/.pth state_dict (torchvision\'s weights for '
        'ImageNet teachers) or the workdir of a baseline run of this trainer (e.g. of '
        'configs/cifar100_baseline.py:resnet56).')
  steps_per_epoch = pipeline.steps_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  dtype = DTYPES[config.dtype]
  model, teacher = method.build(config, spec, dtype)
  backbone = method.backbone(model)
  tx, lr_schedule = state_lib.make_optimizer(config, steps_per_epoch)
  state = state_lib.create_train_state(model, tx, seed=config.seed,
                                       input_shape=spec.image_shape, mesh=mesh)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  ckpts = checkpoint_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  # TensorBoard files from process 0; the console gets the progress lines (every process).
  writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)]) if is_main
            else metric_writers.MultiWriter([]))
  try:
    return _run(config, workdir, method=method, mesh=mesh, spec=spec, pipeline=pipeline,
                model=model, teacher=teacher, backbone=backbone, tx=tx,
                lr_schedule=lr_schedule, state=state, ckpts=ckpts, writer=writer,
                total_steps=total_steps)
  finally:
    writer.flush()
    writer.close()
    ckpts.close()


def _run(config, workdir, *, method, mesh, spec, pipeline, model, teacher, backbone, tx,
         lr_schedule, state, ckpts, writer, total_steps) -> RunResult:
  is_main = jax.process_index() == 0
  steps_per_epoch = pipeline.steps_per_epoch
  run_meta = {'dataset': config.dataset, 'train_subset': config.train_subset,
              'model': config.model, 'method': config.method,
              'teacher': config.teacher, 'batch_size': config.batch_size,
              'steps_per_epoch': steps_per_epoch, 'seed': config.seed,
              'num_classes': spec.num_classes}
  logging.info('%s on %s: %d train / %d eval examples, %d steps per epoch of %d, %d epochs, '
               '%d devices (%d processes), dtype %s.', config.model, config.dataset,
               pipeline.num_train, pipeline.num_eval, steps_per_epoch, config.batch_size,
               config.num_epochs, mesh.size, jax.process_count(), config.dtype)

  if ckpts.latest_step() is not None:
    state, meta = ckpts.restore(state)
    changed = {k: (meta.get(k), run_meta[k]) for k in _RESUME_KEYS if meta.get(k) != run_meta[k]}
    if changed:
      raise ValueError(
          f'{workdir} holds a checkpoint of a different run ({changed}, as (checkpoint, '
          'config)); resuming would not continue it. Use a new --workdir, or the same settings.')
    logging.info('Resumed from %s at step %d (epoch %d, batch %d of %d).', ckpts.state_dir,
                 int(state.step), int(state.step) // steps_per_epoch,
                 int(state.step) % steps_per_epoch, steps_per_epoch)
  elif is_main:
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
    writer.write_hparams(_flat_hparams(config))
  step = int(state.step)
  if spec.eval_split == 'test':
    logging.info('"best" is chosen on the eval split %r of %s, its test set (there is no '
                 'validation split; the authors report best test accuracy the same way). '
                 '"final" is the unbiased number.', spec.eval_split, spec.name)

  eval_step = step_lib.make_eval_step(backbone, spec, mesh)
  teacher_variables, teacher_eval = None, None
  if teacher is not None:
    teacher_variables, source = teacher_lib.load_teacher(
        config.teacher_checkpoint, teacher, name=config.teacher, dataset=config.dataset,
        image_shape=spec.image_shape, mesh=mesh)
  # The method's per-run constants, before the teacher's evaluation: a method that cannot
  # run on this data (CRD without dataset indices) stops here.
  constants = method.prepare(config, spec, teacher=teacher, teacher_variables=teacher_variables,
                             train_labels=pipeline.source.train_labels)
  if teacher is not None and config.eval_teacher:
    teacher_eval = step_lib.evaluate(step_lib.make_eval_step(teacher, spec, mesh),
                                     teacher_variables, pipeline, mesh,
                                     prefetch=config.prefetch_batches)
    logging.info('Teacher %s from %s: top-1 %.2f%%, top-5 %.2f%% on %s %r (%d images, BN in '
                 'eval mode).', config.teacher, source, teacher_eval['top1'],
                 teacher_eval['top5'], config.dataset, spec.eval_split, teacher_eval['count'])
    writer.write_scalars(step, {'teacher/top1': teacher_eval['top1'],
                                'teacher/top5': teacher_eval['top5']})

  train_step = step_lib.make_train_step(
      model=model, teacher=teacher, method=method, config=config, tx=tx,
      lr_schedule=lr_schedule, steps_per_epoch=steps_per_epoch, spec=spec, mesh=mesh,
      constants=constants)

  def backbone_variables(s):
    return method.backbone_variables({'params': s.params, **s.model_state})

  def last_good():
    latest = ckpts.latest_step()
    return (f'The last good checkpoint (step {latest}) in {ckpts.state_dir} is intact; rerun '
            'with the same --workdir to resume from it (e.g. with a lower learning rate).'
            if latest is not None else 'No checkpoint had been saved yet.')

  logger = progress.MetricLogger(writer, total_steps=total_steps,
                                 steps_per_epoch=steps_per_epoch,
                                 global_batch=config.batch_size, nonfinite_hint=last_good)
  saved_step = ckpts.latest_step()
  best_meta = ckpts.model_meta(checkpoint_lib.BEST)
  best = ({'top1': best_meta['eval_top1'], 'top5': best_meta['eval_top5'],
           'epoch': best_meta['epoch']} if best_meta else None)
  last_eval = None

  def save(at_step):
    nonlocal saved_step
    logger.flush(at_step)  # never checkpoint a state that produced a non-finite loss
    if saved_step != at_step:
      with logger.paused():
        ckpts.save(at_step, state, {**run_meta, 'step': at_step,
                                    'epoch': at_step / steps_per_epoch})
      saved_step = at_step

  def evaluate_and_keep_best(at_step):
    nonlocal best, last_eval
    epoch = at_step // steps_per_epoch
    with logger.paused():
      metrics = step_lib.evaluate(eval_step, backbone_variables(state), pipeline, mesh,
                                  prefetch=config.prefetch_batches)
      last_eval = {**metrics, 'epoch': epoch, 'step': at_step}
      if best is None or metrics['top1'] > best['top1']:
        best = {'top1': metrics['top1'], 'top5': metrics['top5'], 'epoch': epoch}
        ckpts.save_model(checkpoint_lib.BEST, at_step, backbone_variables(state), {
            **run_meta, 'step': at_step, 'epoch': epoch, 'eval_top1': metrics['top1'],
            'eval_top5': metrics['top5'], 'eval_split': spec.eval_split,
            'chosen_on': f'highest top-1 on the eval split {spec.eval_split!r} of '
                         f'{spec.name}, evaluated every {config.eval_every_epochs} epoch(s)'})
    writer.write_scalars(at_step, {'eval/top1': metrics['top1'], 'eval/top5': metrics['top5'],
                                   'eval/loss': metrics['loss'], 'eval/best_top1': best['top1']})
    logging.info('epoch %d/%d: eval top-1 %.2f%%, top-5 %.2f%%, loss %.4f (best top-1 %.2f%% '
                 'at epoch %d)', epoch, config.num_epochs, metrics['top1'], metrics['top5'],
                 metrics['loss'], best['top1'], best['epoch'])

  stop_at = min(total_steps, config.stop_after_step or total_steps)
  batch_sharding = state_lib.batch_sharded(mesh)
  with _StopSignal() as stop_signal:
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
          save(step)
        if stop_signal.requested or ckpts.reached_preemption(step):
          save(step)
          logging.warning('Stopped for preemption at step %d; rerun with the same --workdir '
                          'to resume.', step)
          return RunResult(workdir, state, step, total_steps, None, best, teacher_eval,
                           logger.history)
      if step % steps_per_epoch == 0:
        epochs_done = step // steps_per_epoch
        if epochs_done % config.eval_every_epochs == 0 or step == total_steps:
          evaluate_and_keep_best(step)
        if epochs_done % config.checkpoint_every_epochs == 0 or step == total_steps:
          save(step)
  save(step)  # stop_after_step or the end: the state on disk is the one returned

  final = None
  if step == total_steps:
    final_meta = ckpts.model_meta(checkpoint_lib.FINAL)
    if final_meta and final_meta['step'] == step and last_eval is None:
      final = {'top1': final_meta['eval_top1'], 'top5': final_meta['eval_top5'],
               'epoch': final_meta['epoch']}
    else:
      if last_eval is None or last_eval['step'] != step:
        evaluate_and_keep_best(step)
      final = last_eval
      ckpts.save_model(checkpoint_lib.FINAL, step, backbone_variables(state), {
          **run_meta, 'step': step, 'epoch': config.num_epochs, 'eval_top1': final['top1'],
          'eval_top5': final['top5'], 'eval_split': spec.eval_split})
    logging.info('Done: final top-1 %.2f%% (%s/final), best %.2f%% at epoch %d (%s/best, '
                 'chosen on %r).', final['top1'], workdir, best['top1'], best['epoch'], workdir,
                 spec.eval_split)
  else:
    logging.info('Stopped at step %d of %d (config.stop_after_step); rerun with the same '
                 '--workdir to continue.', step, total_steps)
  return RunResult(workdir, state, step, total_steps, final, best, teacher_eval,
                   logger.history)
