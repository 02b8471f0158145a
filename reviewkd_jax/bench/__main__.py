"""Benchmarks a config's distillation train step, against PyTorch, and the input pipeline.

  python -m reviewkd_jax.bench --config=configs/cifar100_r56_r20.py
  python -m reviewkd_jax.bench --config=configs/imagenet_r34_r18.py --dtype=bfloat16 \
      --torch=eager --json=/tmp/r34_r18.json
  python -m reviewkd_jax.bench --config=configs/cifar100_r56_r20.py --batch_size=128 \
      --torch=eager --parts=all --conv --input_pipeline=none

Measures, on synthetic batches already on the device:
- the JAX train step users run (`reviewkd_jax.train.step.make_classifier_train_step`:
  teacher + student + ABFs + loss + SGD update in one compiled program, state donated):
  trace and compile time, per-step time (median and spread) after warm-up, images/s, peak
  memory (device statistics on GPU/TPU, the compiled program's memory analysis on CPU),
  FLOPs per step (XLA's cost analysis) and, on known accelerators, FLOP/s and MFU;
- the same step in PyTorch from the same initial weights (`--torch=eager,compile`), written
  as the authors' loop runs it, and the first step's losses of both frameworks;
- the training input pipeline per host on synthetic CIFAR-100 arrays and ImageNet-sized
  JPEGs (`--input_pipeline`);
- with `--parts=all`, the cost by part in both frameworks on the same shapes (plain student
  step, teacher forward, ABF stack + HCL forward and backward, optimizer update, full step;
  `bench/parts.py`), and with `--conv`, single 3x3 convolutions at resnet20's shapes,
  forward and forward + backward, in XLA:CPU (defaults and the step's options) and PyTorch.
Frameworks alternate in `--rounds` rounds (J, T, J, T, ...) so a change in machine load hits
both alike; each round's JAX-over-PyTorch speed-up and the load average are reported, with a
warning when the load exceeded the core count. Prints a table; `--json` writes everything
(machine, command, date, load before/after included).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the config\'s).')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype (default: config\'s).')
flags.DEFINE_integer('steps', 20, 'Timed steps per framework (after warm-up).')
flags.DEFINE_integer('warmup', 3, 'Untimed steps per framework after the first.')
flags.DEFINE_integer('rounds', 4, 'The timed steps are split into this many rounds, the '
                     'frameworks taking turns, so that load changes affect all alike.')
flags.DEFINE_list('torch', ['eager', 'compile'], 'PyTorch rows: eager, compile (torch.compile '
                  'default mode), max-autotune, or none.')
flags.DEFINE_list('input_pipeline', ['auto'], "Input pipelines to time: cifar100, imagenet, "
                  "'auto' (the config's dataset), 'all', or none.")
flags.DEFINE_list('parts', ['none'], 'Cost by part (bench/parts.py), JAX and PyTorch on the '
                  'same shapes: student_step, teacher_forward, abf_hcl, optimizer, full_step, '
                  "'all', or none.")
flags.DEFINE_integer('parts_per_round', 3, 'Calls per part and framework in each round.')
flags.DEFINE_bool('conv', False, "Time single 3x3 convolutions at resnet20's shapes (forward, "
                  'forward + backward) in JAX and PyTorch at the benchmark batch.')
flags.DEFINE_integer('pipeline_batches', 30, 'Timed batches per input pipeline.')
flags.DEFINE_integer('pipeline_batch_size', None, 'Global batch of the input pipeline '
                     'measurements (default: the config\'s for its own dataset, 128 for '
                     'CIFAR-100 and 256 for ImageNet otherwise).')
flags.DEFINE_string('json', None, 'Write the report as JSON to this path.')

PIPELINE_BATCH = {'cifar100': 128, 'imagenet': 256}


def _dataset_kind(dataset: str) -> str:
  return 'imagenet' if dataset.startswith('imagenet') else 'cifar100'


def run_benchmark(config, *, steps: int = 20, warmup: int = 3, rounds: int = 4,
                  torch_modes=('eager',), input_pipelines=(), pipeline_batches: int = 30,
                  pipeline_batch_size: int | None = None, devices=None,
                  config_name: str = '', parts=(), parts_per_round: int = 3,
                  conv: bool = False) -> dict:
  """Returns the report dict (see the module docstring); `config` is an experiment config."""
  import jax  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.distill import reviewkd  # pylint: disable=g-import-not-at-top
  from reviewkd_jax import platform as platform_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import hardware, input_pipeline, jax_step  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import report as report_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import rounds as rounds_lib  # pylint: disable=g-import-not-at-top

  rounds = max(1, min(rounds, steps))
  per_round = math.ceil(steps / rounds)
  # A short epoch, so that the timed steps cross epoch boundaries (a recompilation there
  # would show up); it changes only the lr/lambda schedule values, never the computation.
  steps_per_epoch = max(1, per_round)
  step = jax_step.build(config, steps_per_epoch=steps_per_epoch, devices=devices)
  report = {
      'command': ' '.join([os.path.basename(sys.executable), '-m', 'reviewkd_jax.bench',
                           *sys.argv[1:]]),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': {**hardware.describe(),
                  'step_compiler_options': platform_lib.step_compiler_options(
                      step.mesh.devices.flat)},
      'config': {'name': config_name, 'dataset': config.dataset, 'model': config.model,
                 'teacher': config.teacher, 'method': config.method,
                 'batch_size': config.batch_size, 'dtype': config.dtype,
                 'teacher_bn_mode': config.teacher_bn_mode,
                 'student_features': config.student_features,
                 'teacher_features': config.teacher_features},
      'settings': {'steps': steps, 'warmup': warmup, 'rounds': rounds,
                   'steps_per_epoch': steps_per_epoch},
      'steps': {},
  }
  runners = {'jax': jax_step.JaxRunner(step)}
  host_variables = jax_step.initial_variables(step)
  teacher_host = jax.device_get(step.teacher_variables)
  runners['jax'].compile()

  torch_modes = [m for m in torch_modes if m and m != 'none']
  if torch_modes and step.teacher is not None and config.method == 'reviewkd':
    from reviewkd_jax.bench import torch_step  # pylint: disable=g-import-not-at-top
    shape = (1, *step.spec.image_shape)
    student_levels = reviewkd.feature_spec(step.model.student, shape, config.student_features)
    teacher_levels = reviewkd.feature_spec(step.teacher, shape, config.teacher_features)
    lam = runners['jax'].result['first_step_metrics'].get('lambda', config.reviewkd_weight)
    lr = runners['jax'].result['first_step_metrics']['lr']
    for mode in torch_modes:
      name = 'torch_eager' if mode == 'eager' else f'torch_{mode.replace("-", "_")}'
      try:
        ts = torch_step.TorchStep(
            config, step.spec, student_variables=host_variables,
            teacher_variables=teacher_host, student_levels=student_levels,
            teacher_levels=teacher_levels, lr=lr, lam=lam,
            device='cuda' if jax.devices()[0].platform == 'gpu' else 'cpu',
            compile_mode=None if mode == 'eager' else mode)
        runner = torch_step.TorchRunner(ts, step.host_batch)
        runner.compile()
        runners[name] = runner
      except Exception as e:  # pylint: disable=broad-except
        report['steps'][name] = {'framework': name, 'error': f'{type(e).__name__}: {e}'}
  elif torch_modes:
    report['torch_skipped'] = f'the PyTorch step implements ReviewKD only (method ' \
                              f'{config.method!r})'

  for runner in runners.values():
    runner.warmup(warmup)
  # Rounds: every framework runs `per_round` timed steps in turn (J, T, J, T, ...).
  rounds_report = rounds_lib.interleaved_rounds(runners, steps, per_round)
  report['rounds'] = rounds_report
  if speedups := rounds_lib.speedups(rounds_report):
    report['speedup'] = speedups
  for name, runner in runners.items():
    report['steps'][name] = runner.summary()

  jax_first = report['steps']['jax']['first_step_metrics']
  report['first_step_agreement'] = {
      name: report_lib.loss_agreement(jax_first, r['first_step_metrics'],
                                      ce_weight=config.ce_weight)
      for name, r in report['steps'].items() if name != 'jax' and 'error' not in r}

  pipelines = []
  for kind in input_pipelines:
    batch = pipeline_batch_size or (config.batch_size if kind == _dataset_kind(config.dataset)
                                    else PIPELINE_BATCH[kind])
    pipelines.append(input_pipeline.measure(kind, batch_size=batch, batches=pipeline_batches))
  report['input_pipeline'] = pipelines
  if parts or conv:
    from reviewkd_jax.bench import parts as parts_lib  # pylint: disable=g-import-not-at-top
    if parts:
      eager = runners.get('torch_eager')
      report['parts'] = parts_lib.measure_parts(
          step, eager.step if eager is not None else None, parts=tuple(parts), rounds=rounds,
          per_round=parts_per_round)
    if conv:
      report['conv'] = parts_lib.measure_convs(
          config.batch_size, rounds=rounds,
          device='cuda' if jax.devices()[0].platform == 'gpu' else 'cpu')
  report['machine']['load_average_end'] = list(os.getloadavg())
  cores = os.cpu_count() or 1
  loads = [report['machine']['load_average'][0] if report['machine']['load_average'] else 0.0,
           *(r['load_average'] for r in rounds_report), report['machine']['load_average_end'][0]]
  if max(loads) > cores:
    report.setdefault('warnings', []).append(
        f'the 1-minute load average reached {max(loads):.1f} on {cores} cores: other work '
        'shared the machine, so these times are not a clean comparison')
  report['targets'] = report_lib.targets(report)
  return report


def _pipelines(requested: list[str], dataset: str) -> list[str]:
  out = []
  for item in requested:
    if item == 'none':
      continue
    if item == 'auto':
      out.append(_dataset_kind(dataset))
    elif item == 'all':
      out += ['cifar100', 'imagenet']
    elif item in PIPELINE_BATCH:
      out.append(item)
    else:
      raise app.UsageError(f'--input_pipeline: unknown {item!r} (cifar100, imagenet, auto, '
                           'all, none)')
  return list(dict.fromkeys(out))


def _parts(requested: list[str]) -> list[str]:
  from reviewkd_jax.bench.parts import PARTS  # pylint: disable=g-import-not-at-top
  out = []
  for item in requested:
    if item == 'none':
      continue
    if item == 'all':
      out += list(PARTS)
    elif item in PARTS:
      out.append(item)
    else:
      raise app.UsageError(f'--parts: unknown {item!r} ({", ".join(PARTS)}, all, none)')
  return list(dict.fromkeys(out))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  from reviewkd_jax import platform as platform_lib  # pylint: disable=g-import-not-at-top
  platform_lib.skip_absent_tpu()  # before JAX's first computation
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only
  from reviewkd_jax.bench import report as report_lib  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  with config.unlocked():
    if FLAGS.batch_size:
      config.batch_size = FLAGS.batch_size
    if FLAGS.dtype:
      config.dtype = FLAGS.dtype
  report = run_benchmark(
      config, steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds,
      torch_modes=FLAGS.torch, input_pipelines=_pipelines(FLAGS.input_pipeline,
                                                          config.dataset),
      pipeline_batches=FLAGS.pipeline_batches, pipeline_batch_size=FLAGS.pipeline_batch_size,
      config_name=os.path.basename(config_flags.get_config_filename(FLAGS['config'])),
      parts=_parts(FLAGS.parts), parts_per_round=FLAGS.parts_per_round, conv=FLAGS.conv)
  print(report_lib.format_table(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2, default=float)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
