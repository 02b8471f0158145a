"""Compiles a config's train step for a described TPU slice, without a TPU: will it fit, how fast can it be.

  python -m reviewkd_jax.preflight --config=configs/imagenet_r34_r18.py --topology=v5e:4x4
  python -m reviewkd_jax.preflight --config=configs/coco_distill.py:pair=faster_r18_r101,method=reviewkd \
      --topology=v5e:2x4 --per_chip_batch=2 --fit

The step is the one training runs, teacher included (classification: `train.setup.build_run`
then `run.train_step()`; detection: `train.detection.make_detector_train_step`), over a 'data' mesh of
every chip of the topology (libtpu describes v4, v5e, v5p and v6e slices of any size; one
process compiles for all their hosts). The train state and the teacher's variables are shapes
(`jax.eval_shape`): nothing runs, no weights or data are read. The report is the TPU
compiler's own analysis: memory per chip against the chip's HBM, FLOPs and bytes per chip,
the FLOP-bound step time at the chip's published bf16 peak, the collectives, compile time;
with `--fit`, the largest per-chip batch that fits, found by compiling (bisection).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from reviewkd_jax import data
from reviewkd_jax import platform

INSTALL_LINE = 'pip install "jax[tpu]==' + jax.__version__ + '"'
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's published per-chip figures."""
  name: str
  bf16_flops: float   # dense peak FLOP/s in bfloat16
  hbm_bytes: int
  source: str         # where Google publishes both figures


# Keyed by the topology name's prefix. Each figure is the "Peak compute per chip (bf16)" and
# "HBM capacity per chip" row of the generation's Cloud TPU system-architecture page.
CHIPS = {
    'v4': Chip('TPU v4', 275e12, 32 * GIB, 'https://cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('TPU v5e', 197e12, 16 * GIB, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('TPU v5p', 459e12, 95 * GIB, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('TPU v6e', 918e12, 32 * GIB, 'https://cloud.google.com/tpu/docs/v6e'),
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


class PreflightError(ValueError):
  """The command cannot run as asked; the message says what to do."""


def topology_devices(topology: str):
  """Returns (the topology's TPU devices, its Chip); PreflightError without libtpu."""
  prefix = topology.split(':', 1)[0]
  if ':' not in topology or prefix not in CHIPS:
    raise PreflightError(f'--topology={topology!r}: give GENERATION:SHAPE with GENERATION one '
                         f'of {", ".join(CHIPS)}, e.g. v5e:2x4 (8 chips), v5e:16x16 (256), '
                         'v4:2x2x2.')
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PreflightError(f'Compiling for TPU needs libtpu, the TPU compiler: {INSTALL_LINE}'
                         ' (it runs on this machine, no TPU needed).') from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not platform.tpu_hardware_present():
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) so that two processes never
    # drive the same chips; with no chips here it would only stop two compiles at once.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # Loading libtpu on a machine without TPUs prints its warnings about the missing hardware
  # (worker hostnames, accelerator type) to the process's stderr; they say nothing about the
  # topology asked for, so they are kept out of the report unless the load fails.
  with tempfile.TemporaryFile(mode='w+') as captured:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      desc = topologies.get_topology_desc(platform='tpu', topology_name=topology)
      error = None
    except Exception as e:  # pylint: disable=broad-except
      error = e
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    if error is not None:
      captured.seek(0)
      raise PreflightError(f'libtpu does not know --topology={topology!r}: '
                           f'{str(error).splitlines()[0][:300]}\n{captured.read()[-2000:]}'
                           ) from error
  return list(desc.devices), CHIPS[prefix]


def _mesh(devices) -> Mesh:
  from reviewkd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  return state_lib.make_mesh(devices)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def classification_step(config: ml_collections.ConfigDict, mesh: Mesh):
  """Returns (the jitted train step, its abstract (state, batch, teacher_variables))."""
  from reviewkd_jax.bench import jax_step  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  spec = data.get_spec(config.dataset)
  run = setup_lib.build_run(config, spec, mesh=mesh,
                            steps_per_epoch=max(1, spec.num_train // config.batch_size))
  state = _abstract(jax.eval_shape(run.init_state))
  teacher_variables = None
  if run.teacher is not None:
    teacher_variables = _abstract(teacher_lib.variables_template(run.teacher, spec.image_shape))
  constants = None
  if run.method.prepare is not _no_constants():
    raise PreflightError(f'config.method={config.method!r} computes per-run constants from the '
                         'teacher and the data (method.prepare); the pre-flight compiles '
                         'methods without them (reviewkd, kd, at, fitnet, ...).')
  one = jax_step.synthetic_batch(spec, 1)
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype)
           for k, v in one.items()}
  return run.train_step(constants), (state, batch, teacher_variables)


def _no_constants():
  from reviewkd_jax.distill import base  # pylint: disable=g-import-not-at-top
  return base.Method.__dataclass_fields__['prepare'].default


def detection_step(config: ml_collections.ConfigDict, mesh: Mesh):
  """Returns (the jitted detection train step, its abstract (state, batch, teacher_variables)).

  The state is built as `train.detection`'s set-up builds it (student, the method's
  trainable module, the masked SGD), from shapes; weights files are not read.
  """
  from reviewkd_jax.detection import distill as det_distill  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.detection import model as model_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.detection import scenes  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.detection.data import COCO_CATEGORY_IDS  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import detection as det  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.weights, config.teacher_weights = '', ''   # shapes only: no file is read
  config = det.resolve_input_conventions(config)
  if config.method not in det.METHODS:
    raise PreflightError(f'config.method={config.method!r} is not a detection method; choose '
                         f'one of {det.METHODS}.')
  num_classes = scenes.NUM_CLASSES if config.dataset == 'digit_scenes' else len(
      COCO_CATEGORY_IDS)
  module = model_lib.RCNN(det.detector_config(config, num_classes))
  image = jax.ShapeDtypeStruct((1, *config.pad_size, 3), jnp.float32)
  teacher, teacher_variables, adapter = None, None, None
  distill_vars: dict = {}
  if config.method != 'none':
    teacher = model_lib.RCNN(det.detector_config(config, num_classes, teacher=True))
    teacher_variables = model_lib.abstract_variables(teacher)
    teacher_shapes = jax.eval_shape(
        lambda v, x: teacher.apply(v, x, method=model_lib.RCNN.features), teacher_variables,
        image)
    student_shapes = jax.eval_shape(
        lambda k, x: module.apply(model_lib.init_variables(module, k), x,
                                  method=model_lib.RCNN.features), jax.random.key(0), image)
    adapter = det.build_adapter(config, {k: v.shape[-1] for k, v in teacher_shapes.items()})
    if adapter is not None:
      if config.method == 'fitnet':
        args, kw = (student_shapes[det_distill.FITNET_LEVEL],), {'train': False}
      elif config.method == 'reviewkd':
        args, kw = (det_distill.pyramid(student_shapes),), {'train': False}
      else:
        args, kw = (det_distill.pyramid(student_shapes),), {}
      distill_vars = flax.core.unfreeze(jax.eval_shape(
          lambda k, a: adapter.init(k, *a, **kw), jax.random.key(0), args))
  variables = flax.core.unfreeze(model_lib.abstract_variables(module))
  student_params = variables.pop('params')
  params = {'student': student_params, 'distill': distill_vars.pop('params', {})}
  model_state = {'student': variables, 'distill': distill_vars}
  tx, schedule = det.make_detector_optimizer(config, params)
  state = _abstract(jax.eval_shape(lambda p: state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, model_state=model_state, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0))), params))
  b, g = config.batch_size, config.max_boxes
  h, w = config.pad_size
  batch = {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
           'image_size': jax.ShapeDtypeStruct((b, 2), jnp.int32),
           'boxes': jax.ShapeDtypeStruct((b, g, 4), jnp.float32),
           'labels': jax.ShapeDtypeStruct((b, g), jnp.int32),
           'gt_valid': jax.ShapeDtypeStruct((b, g), jnp.bool_)}
  if config.mask:
    batch['masks'] = jax.ShapeDtypeStruct((b, g, h, w), jnp.uint8)
  step = det.make_detector_train_step(module, tx, schedule, mesh, config=config,
                                      teacher=teacher, adapter=adapter)
  return step, (state, batch, _abstract(teacher_variables))


def _is_detection(config) -> bool:
  return config.get('task', 'classification') == 'detection'


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Returns {kind: {'count', 'bytes', 'sources'}} of the collectives in an optimised HLO
  module's text.

  Bytes are each op's result (for an all-reduce, the reduced buffer; a combined op's tuple
  counts every element); an async pair counts once, at its '-start'. `sources` are the
  bytes by the JAX operation the op came from (its `op_name` metadata, without the
  `jit(...)` prefix), largest first, at most five.
  """
  out: dict[str, dict[str, Any]] = {}
  sources: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  pattern = re.compile(r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shape, kind, start = match.group(1), match.group(2), match.group(3)
    shapes = re.findall(r'(\w+)\[([\d,]*)\]', shape)
    if start and kind != 'all-reduce' and len(shapes) > 1:
      shapes = shapes[-1:]  # an async start's (operands..., result): the result
    nbytes = sum(_DTYPE_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(',') if d]))
                 for t, dims in shapes)
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += nbytes
    name = re.search(r'op_name="([^"]*)"', line)
    sources[kind][re.sub(r'^jit\([^)]*\)/', '', name.group(1)) if name else '?'] += nbytes
  for kind, entry in out.items():
    entry['sources'] = dict(sources[kind].most_common(5))
  return out


def compile_step(config: ml_collections.ConfigDict, devices, chip: Chip) -> dict:
  """Compiles the config's train step over `devices`; returns the report's figures."""
  mesh = _mesh(devices)
  build = detection_step if _is_detection(config) else classification_step
  t0 = time.perf_counter()
  step, args = build(config, mesh)
  lowered = step.trace(*args).lower()
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  chips = len(devices)
  mem = {'argument_bytes': int(memory.argument_size_in_bytes),
         'output_bytes': int(memory.output_size_in_bytes),
         'alias_bytes': int(memory.alias_size_in_bytes),
         'temp_bytes': int(memory.temp_size_in_bytes),
         'generated_code_bytes': int(memory.generated_code_size_in_bytes)}
  # Live at once: the inputs, the outputs not written into donated inputs, the temporaries.
  mem['peak_bytes'] = (mem['argument_bytes'] + mem['output_bytes'] - mem['alias_bytes']
                       + mem['temp_bytes'])
  flops = float(cost.get('flops', 0.0))
  bound_s = flops / chip.bf16_flops
  return {
      'chips': chips,
      'hosts': len({d.process_index for d in devices}),
      'device_kind': devices[0].device_kind,
      'global_batch': int(config.batch_size),
      'per_chip_batch': int(config.batch_size) // chips,
      'dtype': config.get('dtype', 'float32'),
      'memory': mem,
      'hbm_bytes': chip.hbm_bytes,
      'fits': mem['peak_bytes'] <= chip.hbm_bytes,
      'flops_per_chip': flops,
      'bytes_accessed_per_chip': float(cost.get('bytes accessed', 0.0)),
      'peak_bf16_flops_per_chip': chip.bf16_flops,
      'peak_source': chip.source,
      'flop_bound_step_s': bound_s,
      'flop_bound_images_per_s': int(config.batch_size) / bound_s if bound_s else None,
      'collectives': collectives(compiled.as_text()),
      'lower_s': lower_s,
      'compile_s': compile_s,
  }


def _with_batch(config, per_chip: int, chips: int):
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = per_chip * chips
  if 'eval_batch_size' in config:
    config.eval_batch_size = config.batch_size
  return config


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text or 'exceeds' in text and (
      'HBM' in text or 'memory' in text)


def _fits(config, per_chip, devices, chip) -> tuple[bool, dict | None, str | None]:
  """Returns (fits, the report or None, the compiler's out-of-memory message or None)."""
  try:
    result = compile_step(_with_batch(config, per_chip, len(devices)), devices, chip)
  except Exception as e:  # pylint: disable=broad-except
    if _out_of_memory(e):
      return False, None, str(e).splitlines()[0][:300]
    raise
  return result['fits'], result, None


def largest_fitting_batch(config, devices, chip, *, start: int) -> dict:
  """Returns {'per_chip_batch', 'compiles': [(batch, fits, peak_bytes)]}: the largest per-chip
  batch whose step fits the chip's HBM (0 if batch 1 does not), found by compiling: doubling
  from `start` (or halving) to bracket it, then bisection."""
  tried: dict[int, tuple[bool, int | None]] = {}

  def fits(b):
    if b not in tried:
      ok, result, _ = _fits(config, b, devices, chip)
      tried[b] = (ok, result['memory']['peak_bytes'] if result else None)
    return tried[b][0]

  start = max(1, start)
  if fits(start):
    low, high = start, start * 2
    while fits(high):
      low, high = high, high * 2
  else:
    high, low = start, start // 2
    while low >= 1 and not fits(low):
      high, low = low, low // 2
    if low < 1:
      return {'per_chip_batch': 0, 'compiles': sorted((b, *v) for b, v in tried.items())}
  while high - low > 1:
    mid = (low + high) // 2
    if fits(mid):
      low = mid
    else:
      high = mid
  return {'per_chip_batch': low, 'compiles': sorted((b, *v) for b, v in tried.items())}


def _size(n: float) -> str:
  for unit, scale in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def format_report(r: dict, *, config_name: str = '', topology: str = '') -> str:
  """Returns the report as text."""
  head = (f'{config_name} on {topology}: {r["chips"]} chips ({r["device_kind"]}) on '
          f'{r["hosts"]} hosts, dtype {r["dtype"]}')
  if 'memory' not in r:
    lines = [head, f'batch: {r["global_batch"]} global, {r["per_chip_batch"]} per chip',
             f'The compiler refused the step for memory: {r["compiler_error"]}']
    fit = r.get('largest_fitting')
    if fit is not None:
      lines.append(f'Per-chip batch {r["per_chip_batch"]} does not fit in '
                   f'{_size(r["hbm_bytes"])}: the largest that fits is '
                   f'{fit["per_chip_batch"]} (found by compiling).')
    return '\n'.join(lines)
  m = r['memory']
  lines = [
      head,
      f'batch: {r["global_batch"]} global, {r["per_chip_batch"]} per chip',
      f'memory per chip: arguments {_size(m["argument_bytes"])}, temporaries '
      f'{_size(m["temp_bytes"])}, outputs {_size(m["output_bytes"])} ({_size(m["alias_bytes"])} of '
      f'them in donated inputs); peak {_size(m["peak_bytes"])} of {_size(r["hbm_bytes"])} HBM: '
      + ('fits' if r['fits'] else 'DOES NOT FIT'),
      f'per chip per step: {r["flops_per_chip"] / 1e9:.4g} GFLOP, '
      f'{r["bytes_accessed_per_chip"] / 1e9:.4g} GB accessed',
      f'FLOP-bound step time at {r["peak_bf16_flops_per_chip"] / 1e12:.0f} TFLOP/s per chip '
      f'(the bf16 peak published at {r["peak_source"]}): {r["flop_bound_step_s"] * 1e3:.4g} '
      f'ms, so at most {r["flop_bound_images_per_s"]:,.0f} images/s',
      'collectives per step: ' + (', '.join(
          f'{kind} x{c["count"]} ({_size(c["bytes"])})'
          for kind, c in sorted(r['collectives'].items())) or 'none'),
      *(f'  {kind} bytes mostly from: ' + '; '.join(
          f'{name} ({_size(n)})' for name, n in list(c['sources'].items())[:3])
        for kind, c in sorted(r['collectives'].items())),
      f'compile: {r["lower_s"]:.1f} s to trace and lower, {r["compile_s"]:.1f} s to compile',
      'These are the TPU compiler\'s analyses of the program, not measurements on hardware.',
  ]
  fit = r.get('largest_fitting')
  if fit is not None:
    if not r['fits']:
      lines.insert(3, f'Per-chip batch {r["per_chip_batch"]} does not fit: the largest that '
                   f'fits is {fit["per_chip_batch"]} (found by compiling).')
    else:
      lines.append(f'largest per-chip batch that fits: {fit["per_chip_batch"]} (found by '
                   'compiling)')
  return '\n'.join(lines)


def run(config: ml_collections.ConfigDict, topology: str, *, per_chip_batch: int | None = None,
        fit: bool = False) -> dict:
  """Returns the report of `config`'s step on `topology` (PreflightError for bad input)."""
  devices, chip = topology_devices(topology)
  chips = len(devices)
  if per_chip_batch:
    config = _with_batch(config, per_chip_batch, chips)
  elif config.batch_size % chips:
    raise PreflightError(f'config.batch_size={config.batch_size} does not split over the '
                         f'{chips} chips of {topology}: set --per_chip_batch=N or a batch '
                         'size that is a multiple of the chip count.')
  _, result, error = _fits(config, config.batch_size // chips, devices, chip)
  if result is None:  # the compiler refused the program for its memory
    result = {'chips': chips, 'hosts': len({d.process_index for d in devices}),
              'device_kind': devices[0].device_kind, 'global_batch': int(config.batch_size),
              'per_chip_batch': int(config.batch_size) // chips,
              'dtype': config.get('dtype', 'float32'), 'hbm_bytes': chip.hbm_bytes,
              'fits': False, 'compiler_error': error}
  if fit or not result['fits']:
    result['largest_fitting'] = largest_fitting_batch(
        config, devices, chip, start=config.batch_size // chips)
  return result


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  del argv
  flags_ = flags.FLAGS
  config = flags_.config
  if flags_.dtype:
    config = ml_collections.ConfigDict(config.to_dict())
    config.dtype = flags_.dtype
  name = config_flags.get_config_filename(flags_['config'])
  if flags_.dtype and _is_detection(config):
    print('--dtype: the detection step computes in float32 (its config has no dtype field); '
          'leave --dtype out.', file=sys.stderr)
    return 2
  try:
    result = run(config, flags_.topology, per_chip_batch=flags_.per_chip_batch, fit=flags_.fit)
  except PreflightError as e:
    print(e, file=sys.stderr)
    return 2
  print(format_report(result, config_name=name, topology=flags_.topology), flush=True)
  if flags_.json:
    with open(flags_.json, 'w') as f:
      json.dump({'config': name, 'topology': flags_.topology, **result}, f, indent=2)
  return 0


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
  flags.DEFINE_string('topology', 'v5e:2x4', 'TPU slice GENERATION:SHAPE (v4, v5e, v5p, v6e), '
                      'e.g. v5e:2x4 (8 chips, 1 host... as libtpu describes it), v5e:16x16.')
  flags.DEFINE_integer('per_chip_batch', None, 'Images per chip (default: the config\'s '
                       'batch_size split over the chips).')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype (default: the '
                    'config\'s; detection configs compute in float32).')
  flags.DEFINE_bool('fit', False, 'Also find the largest per-chip batch that fits, by '
                    'compiling (several compiles).')
  flags.DEFINE_string('json', None, 'Also write the report here as JSON.')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  platform.skip_absent_tpu()
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
