"""`train_detector(config, workdir)`: one detection run, a Faster/Mask R-CNN trained alone or
distilled from a frozen teacher detector (`config.method`, `detection/methods/`).

Detectron2's recipe: SGD with momentum on every trainable parameter (the stem, res2 and every
backbone BatchNorm frozen), `WarmupMultiStepLR` over iterations; the loss is the RPN's and RoI
heads' plus the method's terms. COCO box (and mask) AP over every evaluation image, every
`eval_every_steps` and at the end; the final model is exported to `<workdir>/final`.

Read top to bottom: `_set_up` builds the detector, the method's adapter, the data and the
train state (resumed, or initialised from `config.weights`) without writing (a mistake is one
`SetupError`, `run_core`); `make_detector_train_step` is the jitted step; `_train` runs the
loop.
`max_steps=0` evaluates the loaded weights only (a teacher's AP).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from reviewkd_jax import data as data_lib
from reviewkd_jax import platform
from reviewkd_jax.detection import backbone as backbone_lib
from reviewkd_jax.detection import data as det_data
from reviewkd_jax.detection import distill as det_distill  # noqa: F401  (read as detection.det_distill)
from reviewkd_jax.detection import evaluation
from reviewkd_jax.detection import methods as methods_lib
from reviewkd_jax.detection import model as model_lib
from reviewkd_jax.detection import weights as weights_lib
from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import progress
from reviewkd_jax.train import run_core
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train.run_core import SETTINGS, RunResult, StopSignal

# What the detector reads of a batch (the rest stays on the host, for evaluation).
_TRAIN_KEYS = ('image', 'image_size', 'boxes', 'labels', 'gt_valid', 'masks')
# A checkpoint is resumed only by a run with the same config (after the input conventions are
# resolved), but for these fields: how the run logs, evaluates, checkpoints, where it stops and
# where it reads its files, not what it trains (the lr steps are absolute, so `max_steps` may
# grow or shrink).
RESUMABLE_FIELDS = ('data_dir', 'annotations_dir', 'prefetch_batches', 'eval_batch_size',
                    'eval_subset', 'detections_per_image', 'max_steps', 'log_every_steps',
                    'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                    'stop_after_step')
# Checkpoints saved without the config's settings are compared on these fields.
_RESUME_KEYS = ('dataset', 'backbone', 'mask', 'convention', 'batch_size', 'seed',
                'max_steps', 'train_subset', 'method', 'teacher_backbone')
METHODS = tuple(methods_lib.list_detection_methods())


DetectionResult = RunResult  # the former name of a detection run's result


def _or(value, default):
  return default if value is None else value


def detector_config(config: ml_collections.ConfigDict, num_classes: int, *,
                    teacher: bool = False) -> model_lib.DetectorConfig:
  """Returns the student's (or, with `teacher`, the teacher's) static detector settings."""
  if config.convention not in ('detectron2', 'torchvision'):
    raise ValueError(f"config.convention must be 'detectron2' or 'torchvision', got "
                     f'{config.convention!r}.')
  pre = 'teacher_' if teacher else ''
  given = {f: config[pre + f] for f in INPUT_FIELDS}
  fill = model_lib.TORCHVISION_INPUT   # unset fields (resolve_input_conventions fills them)
  common = dict(stride_in_1x1=bool(_or(given['stride_in_1x1'], fill.stride_in_1x1)),
                input_format=_or(given['input_format'], fill.input_format),
                pixel_mean=tuple(_or(given['pixel_mean'], fill.pixel_mean)),
                pixel_std=tuple(_or(given['pixel_std'], fill.pixel_std)),
                freeze_at=config.freeze_at,
                fpn_channels=config.fpn_channels, box_head_dim=config.box_head_dim,
                mask_head_dim=config.mask_head_dim)
  backbone = config[pre + 'backbone']
  if config.convention == 'torchvision':
    base = model_lib.DetectorConfig.torchvision(num_classes, mask=config.mask,
                                                backbone=backbone, **common)
  else:
    base = model_lib.DetectorConfig(backbone=backbone, num_classes=num_classes,
                                    mask=config.mask, **common)
  rpn = dataclasses.replace(base.rpn, pre_nms_topk=tuple(config.rpn_pre_nms_topk),
                            post_nms_topk=tuple(config.rpn_post_nms_topk))
  roi = dataclasses.replace(base.roi, batch_size_per_image=config.roi_batch_size_per_image,
                            sampling_ratio=config.roi_sampling_ratio,
                            max_sampling_ratio=config.roi_max_sampling_ratio,
                            max_detections=config.detections_per_image)
  return dataclasses.replace(base, rpn=rpn, roi=roi)


INPUT_FIELDS = model_lib.InputConvention._fields


def _weights_convention(path: str, source: str) -> model_lib.InputConvention | None:
  """Returns the input convention weights at `path` imply: a file's (`weights.py`), or for a
  run folder of this trainer the student convention its config.json recorded."""
  folder = epath.Path(path)
  if folder.is_dir():
    for candidate in (folder, folder.parent, folder.parent.parent):
      if (candidate / 'config.json').exists():
        recorded = json.loads((candidate / 'config.json').read_text())
        if all(recorded.get(f) is not None for f in INPUT_FIELDS):
          return model_lib.InputConvention(
              bool(recorded['stride_in_1x1']), recorded['input_format'],
              tuple(recorded['pixel_mean']), tuple(recorded['pixel_std']))
    return None
  return weights_lib.file_convention(path, source)


def resolve_input_conventions(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns `config` with every unset (None) input field of the student and the teacher
  filled from the convention their weights imply (torchvision's without weights).

  A field the config sets is kept; one that differs from what the weights imply is logged
  as a warning. Weights that imply nothing (the ReviewKD authors' students) need the fields.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  roles = [('', 'weights', 'weights_source')]
  if methods_lib.get_detection_method(config.method).uses_teacher:
    roles.append(('teacher_', 'teacher_weights', 'teacher_weights_source'))
  for pre, path_field, source_field in roles:
    path = config[path_field]
    implied = _weights_convention(path, config[source_field]) if path else None
    given = {f: config[pre + f] for f in INPUT_FIELDS}
    if path and implied is None and any(v is None for v in given.values()):
      raise ValueError(
          f'config.{path_field}={path!r} does not say which input convention its weights were '
          f'trained with: set --config.{pre}stride_in_1x1, --config.{pre}input_format, '
          f'--config.{pre}pixel_mean and --config.{pre}pixel_std.')
    base = implied or model_lib.TORCHVISION_INPUT
    for f, v in given.items():
      if v is None:
        config[pre + f] = getattr(base, f)
      elif implied is not None and not np.array_equal(np.asarray(v), np.asarray(
          getattr(implied, f))):
        logging.warning('config.%s%s=%r is not what %s implies (%r); kept as the config says.',
                        pre, f, v, path, getattr(implied, f))
  return config


def build_adapter(config: ml_collections.ConfigDict, teacher_channels: dict
                  ) -> nn.Module | None:
  """Returns the method's trainable adapter (`DetectionMethod.build_adapter`), or None."""
  return methods_lib.get_detection_method(config.method).build_adapter(config,
                                                                       teacher_channels)


def detector_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Returns Detectron2's WarmupMultiStepLR (linear warm-up) as a function of the step."""
  base = state_lib.base_learning_rate(config)
  steps = tuple(int(s) for s in config.lr_steps)
  if list(steps) != sorted(steps):
    raise ValueError(f'config.lr_steps must be increasing, got {steps}.')
  warmup, factor, gamma = config.warmup_steps, config.warmup_factor, config.lr_gamma

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    alpha = jnp.clip(step / max(warmup, 1), 0.0, 1.0)
    warm = jnp.where(step < warmup, factor * (1 - alpha) + alpha, 1.0)
    decays = sum((step >= s).astype(jnp.float32) for s in steps) if steps else 0.0
    return base * warm * gamma ** decays

  return schedule


def make_detector_optimizer(config: ml_collections.ConfigDict, params: Any
                            ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (PyTorch's SGD, `state.pytorch_sgd`, with the frozen parameters masked out; the
  lr schedule, `detector_lr_schedule`).

  `params` is {'student': the detector's, 'distill': the method's trainable module's}.
  """
  schedule = detector_lr_schedule(config)
  frozen = {'student': backbone_lib.frozen_param_mask(params['student'], config.freeze_at),
            'distill': jax.tree.map(lambda _: False, params['distill'])}
  tx = state_lib.pytorch_sgd(schedule, weight_decay=config.weight_decay,
                             momentum=config.momentum, frozen=frozen)
  return tx, schedule


def make_detector_train_step(module: model_lib.RCNN, tx, schedule, mesh, *, config,
                             teacher: model_lib.RCNN | None = None,
                             adapter: nn.Module | None = None):
  """Returns the jitted step (state, batch, teacher_variables) -> (state, metrics).

  The batch is split over `mesh` (`state.jit_train_step`). With a distillation method
  (`config.method`), the frozen teacher's features enter the method's loss terms without
  gradient; `state.params` is {'student': ..., 'distill': the method's adapter}.
  """
  method = methods_lib.get_detection_method(config.method)

  def step(state: state_lib.TrainState, batch, teacher_variables):
    key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      svars = {'params': params['student'], **state.model_state['student']}
      feats = module.apply(svars, batch['image'], batch['image_size'],
                           method=model_lib.RCNN.features)
      out = module.apply(svars, batch, key, feats, return_aux=method.needs_roi_outputs,
                         method=model_lib.RCNN.losses)
      losses, roi_outputs = out if method.needs_roi_outputs else (out, None)
      adapter_state = state.model_state['distill']
      if method.uses_teacher:
        tfeats = jax.lax.stop_gradient(teacher.apply(
            teacher_variables, batch['image'], batch['image_size'],
            method=model_lib.RCNN.features))
        terms, adapter_state = method.loss_terms(methods_lib.DetectionLossContext(
            config=config, detector=module, features=feats, teacher=teacher,
            teacher_variables=teacher_variables, teacher_features=tfeats, batch=batch,
            roi_outputs=roi_outputs, adapter=adapter, adapter_params=params['distill'],
            adapter_state=adapter_state))
        losses.update(terms)
      return sum(losses.values()), (losses, adapter_state)

    (loss, (losses, adapter_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, **losses, 'lr': schedule(state.step)}
    model_state = {**state.model_state, 'distill': adapter_state}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state), metrics

  return state_lib.jit_train_step(step, mesh)


def make_predict_step(module: model_lib.RCNN, mesh):
  """Returns the jitted (variables, images, sizes) -> detections dict, split over `mesh`."""

  def predict(variables, images, sizes):
    dets = module.apply(variables, images, sizes, method=model_lib.RCNN.predict)
    out = {'boxes': dets.boxes, 'scores': dets.scores, 'classes': dets.classes,
           'valid': dets.valid}
    if dets.masks is not None:
      out['masks'] = dets.masks
    return out

  rep, split = state_lib.replicated(mesh), state_lib.batch_sharded(mesh)
  return jax.jit(predict, in_shardings=(rep, split, split), out_shardings=split)


def evaluate_detector(predict_step, variables, pipeline: det_data.DetectionPipeline, mesh, *,
                      masks: bool) -> dict:
  """Returns COCO AP of `variables` over every evaluation image (on every process), and logs
  where the time went: the detector on the device (its compilation included the first time),
  the detections to COCO results on the host (boxes back to the image, masks pasted and
  run-length encoded), and COCOeval."""
  split = state_lib.batch_sharded(mesh)
  start = time.monotonic()
  evaluator = evaluation.CocoEvaluator(pipeline.ground_truth(), pipeline.category_ids,
                                       masks=masks)
  count, predict_s, to_coco_s = 0, 0.0, 0.0
  for batch in pipeline.eval_batches():
    tick = time.monotonic()
    images = jax.make_array_from_process_local_data(split, batch['image'])
    sizes = jax.make_array_from_process_local_data(split, batch['image_size'])
    dets = predict_step(variables, images, sizes)
    local = {k: np.asarray(multihost_utils.global_array_to_host_local_array(
        v, mesh, PartitionSpec(state_lib.DATA_AXIS))) for k, v in dets.items()}
    tock = time.monotonic()
    evaluator.add(batch, local)
    predict_s += tock - tick
    to_coco_s += time.monotonic() - tock
    count += int(np.sum(batch['valid']))
  tick = time.monotonic()
  metrics = evaluator.evaluate(all_processes=True)
  now = time.monotonic()
  logging.info('Evaluation of %d images in %.1fs: detector %.1fs, detections to COCO results '
               '%.1fs, COCOeval %.1fs, input and ground truth %.1fs.', count, now - start,
               predict_s, to_coco_s, now - tick,
               (now - start) - predict_s - to_coco_s - (now - tick))
  metrics['count'] = count
  return metrics


# ---------------------------------------------------------------------------------- run


@dataclasses.dataclass
class _Setup:
  config: ml_collections.ConfigDict
  module: model_lib.RCNN
  mesh: Any
  pipeline: det_data.DetectionPipeline
  state: state_lib.TrainState
  resumed: bool
  ckpts: checkpoint_lib.RunCheckpoints
  run_meta: dict
  tx: Any
  schedule: Any
  weights_report: str | None
  teacher: model_lib.RCNN | None
  teacher_variables: Any
  adapter: nn.Module | None


def train_detector(config: ml_collections.ConfigDict, workdir: str, *,
                   devices=None) -> RunResult:
  """Trains and evaluates the detector of `config` in `workdir`, resuming where it stopped.

  Raises SetupError for a run that cannot start (config, missing data or weights, a workdir
  of another run), before anything in the workdir is written.
  """
  return run_core.start_run(workdir, lambda: _set_up(config, workdir, devices),
                            lambda setup, writer: _train(setup, workdir, writer))


def _set_up(config, workdir: str, devices) -> _Setup:
  """Builds the run and reads the workdir, writing nothing."""
  _check_values(config)
  config = resolve_input_conventions(config)
  mesh = state_lib.make_mesh(devices)
  init_options = platform.init_compiler_options(mesh.devices.flat)
  run_core.check_batch_divides(config, mesh.size)
  method = methods_lib.get_detection_method(config.method)
  method.check_config(config)
  if method.uses_teacher and not (config.teacher_backbone and config.teacher_weights):
    raise ValueError(
        f'config.method={config.method!r} distils from a teacher detector: set '
        '--config.teacher_backbone (e.g. resnet101) and --config.teacher_weights=PATH (a '
        'Detectron2 model-zoo .pkl such as model_final_f6e8b1.pkl for faster_rcnn_R_101_FPN_3x, '
        'a torchvision detection .pth, or the final/ folder of a run of this trainer).')
  for field in ('weights', 'teacher_weights'):
    if config[field] and not epath.Path(config[field]).exists():
      raise FileNotFoundError(
          f'config.{field}={config[field]!r} does not exist. Give a Detectron2 model-zoo '
          '.pkl, a torchvision detection or ImageNet .pth'
          + (', or leave it empty to start from random weights.' if field == 'weights'
             else '.'))
  data_config = det_data.DetectionDataConfig.from_config(config, masks=config.mask)
  pipeline = det_data.create_detection_pipeline(
      data_config, process_index=jax.process_index(), process_count=jax.process_count())
  _check_coco_annotations(data_config)
  run_meta = {**{k: config[k] for k in _RESUME_KEYS},
              SETTINGS: run_core.trained_settings(config, RESUMABLE_FIELDS)}
  check_meta = lambda meta: _check_same_run(  # pylint: disable=unnecessary-lambda-assignment
      meta, run_meta, workdir)
  # The workdir: another experiment's is refused before a network is built or compiled.
  ckpts = checkpoint_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  report = None
  try:
    ckpts.check_newest_meta(check_meta)
    module = model_lib.RCNN(detector_config(config, pipeline.num_classes))
    image = jnp.zeros((1, *config.pad_size, 3), jnp.float32)

    teacher, teacher_variables, adapter = None, None, None
    rep = state_lib.replicated(mesh)
    adapter_vars: dict = {}
    if method.uses_teacher:
      teacher = model_lib.RCNN(detector_config(config, pipeline.num_classes, teacher=True))
      teacher_variables = _load_teacher(config, teacher)
      teacher_shapes = jax.eval_shape(
          lambda v: teacher.apply(v, image, method=model_lib.RCNN.features), teacher_variables)
      student_shapes = jax.eval_shape(
          lambda k: module.apply(model_lib.init_variables(module, k), image,
                                 method=model_lib.RCNN.features), jax.random.key(0))
      adapter = method.build_adapter(config, {k: v.shape[-1] for k, v in teacher_shapes.items()})
      if adapter is not None:
        zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in student_shapes.items()}
        args, kw = method.adapter_inputs(zeros)
        adapter_vars = flax.core.unfreeze(jax.jit(
            lambda k: adapter.init(k, *args, **kw), compiler_options=init_options)(
                jax.random.key(config.seed + 2)))
      teacher_variables = jax.device_put(teacher_variables, rep)

    variables = flax.core.unfreeze(jax.jit(
        lambda k: model_lib.init_variables(module, k), compiler_options=init_options)(
            jax.random.key(config.seed)))
    student_params = variables.pop('params')
    params = {'student': student_params, 'distill': adapter_vars.pop('params', {})}
    model_state = {'student': variables, 'distill': adapter_vars}
    tx, schedule = make_detector_optimizer(config, params)
    init_opt_state = jax.jit(tx.init)   # one program, not an eager op per parameter shape
    state = jax.device_put(state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=init_opt_state(params),
        rng=jax.random.key_data(jax.random.key(config.seed + 1))), rep)
    resumed = ckpts.restore_newest_usable(state, check_meta=check_meta)
    if resumed is not None:
      state = resumed[0]
    elif config.weights:
      loaded = weights_lib.load_detector_weights(
          config.weights, {'params': student_params, **variables},
          source=config.weights_source)
      new = flax.core.unfreeze(loaded.variables)
      params = {'student': new.pop('params'), 'distill': params['distill']}
      state = jax.device_put(state.replace(
          params=params, model_state={**model_state, 'student': new},
          opt_state=init_opt_state(params)), rep)
      report = str(loaded.report)
  except BaseException:
    ckpts.close()
    raise
  return _Setup(config=config, module=module, mesh=mesh, pipeline=pipeline, state=state,
                resumed=resumed is not None, ckpts=ckpts, run_meta=run_meta, tx=tx,
                schedule=schedule, weights_report=report, teacher=teacher,
                teacher_variables=teacher_variables, adapter=adapter)


def _check_values(config) -> None:
  """Raises ValueError for a count out of range or a pad size no resized image fits in."""
  run_core.check_counts(config, at_least_one=('batch_size', 'eval_batch_size', 'max_boxes',
                                               'log_every_steps'),
                         at_least_zero=('max_steps', 'train_subset', 'keep_checkpoints', 'eval_subset',
                                        'eval_every_steps', 'checkpoint_every_steps',
                                        'stop_after_step'))
  if config.weights and epath.Path(config.weights).is_dir():
    raise ValueError(
        f'config.weights={config.weights!r} is a folder, not a weights file: give a Detectron2 '
        'model-zoo .pkl or a torchvision detection or ImageNet .pth (a run\'s final/ folder '
        'serves as a teacher, config.teacher_weights).')
  # Every image's shorter side is resized to (up to) these, capped by the max sizes; an image
  # no taller than wide or the reverse then needs at least this much on both pad sides.
  need = max(min(max(config.train_min_sizes), config.train_max_size),
             min(config.test_min_size, config.test_max_size))
  if min(config.pad_size) < need:
    raise ValueError(
        f'config.pad_size={tuple(config.pad_size)} is smaller than the resized images: their '
        f'shorter side becomes up to {need} (train_min_sizes={tuple(config.train_min_sizes)}, '
        f'test_min_size={config.test_min_size}, capped at train_max_size/test_max_size); '
        f'raise pad_size to at least ({need}, {need}) (a multiple of 32), or lower the sizes.')


def check_annotation_json(path: str, *, parse: bool) -> None:
  """Raises ValueError naming `path` when a COCO instances json is empty, cut short or not
  COCO's: with `parse`, reads it whole (the evaluation file, ~25 MB); else only checks that
  it opens and closes as one JSON object (the training file, ~450 MB, read when masks are)."""
  def broken(why):
    return ValueError(f'The COCO annotation file {path} is {why}: download '
                      f'{det_data.ANNOTATIONS_URL} and unzip it again (or fix '
                      'config.annotations_dir).')
  size = os.path.getsize(path)
  if size == 0:
    raise broken('empty (0 bytes)')
  if not parse:
    with open(path, 'rb') as f:
      head = f.read(64).lstrip()
      f.seek(max(0, size - 64))
      tail = f.read().rstrip()
    if not (head.startswith(b'{') and tail.endswith(b'}')):
      raise broken(f'not one whole JSON object ({size} bytes; cut short?)')
    return
  try:
    with open(path, 'rb') as f:
      content = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise broken(f'not valid JSON ({size} bytes; {str(e).splitlines()[0][:120]})') from None
  missing = [k for k in ('images', 'annotations', 'categories')
             if not isinstance(content, dict) or not isinstance(content.get(k), list)]
  if missing:
    raise broken(f'not a COCO instances file (no {", ".join(missing)} list)')


def _check_coco_annotations(data_config: det_data.DetectionDataConfig) -> None:
  """Checks COCO's annotation files at setup, not at the first evaluation or mask batch (a
  missing one is reported by the pipeline where it is needed)."""
  if not data_config.dataset.startswith('coco/'):
    return
  splits = [(data_config.eval_split, True)]
  if data_config.masks:
    splits.append((data_config.train_split, False))
  for split, parse in splits:
    try:
      path = det_data.annotation_file(data_config, split)
    except det_data.DetectionDataNotFoundError:
      continue
    check_annotation_json(path, parse=parse)


def _load_teacher(config, teacher: model_lib.RCNN) -> Any:
  """Returns the frozen teacher's variables from `config.teacher_weights`: a Detectron2 or
  torchvision file, or a `final`/`best` folder (or workdir) of a run of this trainer."""
  template = model_lib.abstract_variables(teacher)
  path = epath.Path(config.teacher_weights)
  if path.is_dir():
    folder = path / checkpoint_lib.FINAL if (path / checkpoint_lib.FINAL).exists() else path
    variables, _ = checkpoint_lib.load_model(
        str(folder), template,
        sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    logging.info('Teacher %s from %s.', config.teacher_backbone, folder)
    return variables
  loaded = weights_lib.load_detector_weights(str(path), template,
                                             source=config.teacher_weights_source)
  logging.info('Teacher %s from %s: %s', config.teacher_backbone, path, loaded.report)
  return loaded.variables


def _check_same_run(meta: dict, run_meta: dict, workdir: str) -> None:
  run_core.check_same_run(meta, run_meta, workdir, RESUMABLE_FIELDS, _RESUME_KEYS)


def _train(setup: _Setup, workdir: str, writer) -> RunResult:
  config, mesh, pipeline, ckpts = setup.config, setup.mesh, setup.pipeline, setup.ckpts
  state, total = setup.state, config.max_steps
  step = int(state.step)
  logging.info('%s %s-FPN (%s conventions) on %s: %d classes, %d evaluation images, global '
               'batch %d over %d devices (%d processes), %d steps%s.',
               'Mask R-CNN' if config.mask else 'Faster R-CNN', config.backbone,
               config.convention, config.dataset, pipeline.num_classes, pipeline.num_eval,
               config.batch_size, mesh.size, jax.process_count(), total,
               '' if not methods_lib.get_detection_method(config.method).uses_teacher else
               f', distilled by {config.method} from a {config.teacher_backbone}-FPN teacher')
  if setup.weights_report:
    logging.info('Weights from %s: %s', config.weights, setup.weights_report)
  if setup.resumed:
    logging.info('Resumed from %s at step %d.', ckpts.state_dir, step)
  else:
    run_core.record_config(workdir, config, writer)

  predict_step = make_predict_step(setup.module, mesh)
  evals = []

  def student_variables():
    return {'params': state.params['student'], **state.model_state['student']}

  def run_eval(at_step: int) -> dict:
    variables = student_variables()
    metrics = evaluate_detector(predict_step, variables, pipeline, mesh, masks=config.mask)
    metrics['step'] = at_step
    evals.append(metrics)
    writer.write_scalars(at_step, {f'eval/{k}': v for k, v in metrics.items()
                                   if k not in ('step', 'count')})
    segm = f', mask AP {100 * metrics["segm/AP"]:.2f}' if 'segm/AP' in metrics else ''
    logging.info('step %d: box AP %.2f (AP50 %.2f, AP75 %.2f)%s on %d images.', at_step,
                 100 * metrics['bbox/AP'], 100 * metrics['bbox/AP50'],
                 100 * metrics['bbox/AP75'], segm, metrics['count'])
    return metrics

  if total == 0:  # evaluate the given weights only
    final = run_eval(0)
    return RunResult(workdir, state, 0, 0, final, [], evals)

  train_step = make_detector_train_step(setup.module, setup.tx, setup.schedule, mesh,
                                        config=config, teacher=setup.teacher,
                                        adapter=setup.adapter)
  num_train = getattr(pipeline.source, 'num_train', 0)
  steps_per_epoch = max(1, num_train // config.batch_size) if num_train else total
  logger = progress.MetricLogger(
      writer, total_steps=total, steps_per_epoch=steps_per_epoch,
      global_batch=config.batch_size,
      nonfinite_hint=lambda: run_core.last_good_hint(ckpts))
  meta = lambda s: {**setup.run_meta, 'step': s}  # noqa: E731
  stop_at = min(total, config.stop_after_step or total)
  split = state_lib.batch_sharded(mesh)
  keys = [k for k in _TRAIN_KEYS if k != 'masks' or config.mask]
  batches = data_lib.to_global_arrays(
      ({k: b[k] for k in keys} for b in pipeline.train_batches(step)), split,
      prefetch=config.prefetch_batches)
  with StopSignal() as stop_signal:
    while step < stop_at:
      state, metrics = train_step(state, next(batches), setup.teacher_variables)
      step += 1
      logger.add(metrics)
      if step % config.log_every_steps == 0 or step == stop_at:
        logger.flush(step)
      save = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
      stop = stop_signal.requested or ckpts.reached_preemption(step)
      if save or stop or step == stop_at:
        logger.flush(step)
        with logger.paused('checkpoint'):
          ckpts.save(step, state, meta(step))
      if stop:
        logging.warning('Stopped at step %d; rerun with the same --workdir to resume.', step)
        return RunResult(workdir, state, step, total, None, logger.history, evals)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total:
        with logger.paused('eval'):
          run_eval(step)
  final = None
  if step == total:
    final_meta = run_core.finished_model_meta(ckpts, step, 'bbox/AP')
    if final_meta:
      final = {k: v for k, v in final_meta.items() if '/' in k}
    else:
      final = run_eval(step)
      ckpts.save_model(checkpoint_lib.FINAL, step, student_variables(),
                       {**meta(step), **{k: v for k, v in final.items() if '/' in k}})
    logging.info('Done: final box AP %.2f%s (%s/final).', 100 * final['bbox/AP'],
                 f', mask AP {100 * final["segm/AP"]:.2f}' if 'segm/AP' in final else '',
                 workdir)
  else:
    logging.info('Stopped at step %d of %d (config.stop_after_step); rerun with the same '
                 '--workdir to continue.', step, total)
  return RunResult(workdir, state, step, total, final, logger.history, evals)
