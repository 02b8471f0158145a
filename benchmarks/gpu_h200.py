"""The distillation train steps on one GPU against PyTorch, in one command (sized for an H200).

  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_h200.py --out=$OUT --label=run1 --budget_s=385
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_h200.py --out=$OUT --label=run2 --budget_s=392 \
      --xla_flags=--xla_gpu_enable_command_buffer=+CONVOLUTION \
      --items=cifar_b128,cifar_b128@noflags,imagenet_bf16,detection,detection@noflags
  python benchmarks/gpu_h200.py --cpu_flops $OUT/gpu_h200_run1.json  # FLOPs, MFU (on a CPU)
  python benchmarks/gpu_h200.py --out=/tmp/gpu_tiny --tiny --budget_s=300   # smoke test

(docs/performance_gpu.md has what these measured on an H200.) `--xla_flags` is appended to
XLA_FLAGS in every item; an item named `NAME@noflags` runs NAME's JAX step alone without
those flags, the same-run control of a flag.

Measures, each item in its own subprocess (so a crash, an out-of-memory or a hang costs that
item only, and each item's peak memory is its own), in this order, until `--budget_s` is
spent:
  probe           the machine (nvidia-smi, library versions, torchvision's CUDA ops) and two
                  ceilings: a bf16 8192^3 matrix product in PyTorch and in JAX;
  imagenet_bf16   ImageNet resnet34 -> resnet18 ReviewKD, global batch 256, bfloat16;
  cifar_b128      CIFAR-100 resnet32x4 -> resnet8x4, batch 128, bfloat16;
  cifar_b1024     the same at batch 1024;
  detection       Faster R-CNN R18-FPN <- R101-FPN ReviewKD (configs/coco_distill.py), 2
                  images of 800x1333 padded to 800x1344 (the multiple of 32 that Detectron2
                  and torchvision pad 800x1333 to), float32; against the same computation in
                  PyTorch on torchvision's Faster R-CNN (student R18-FPN step + R101-FPN
                  teacher pyramid under no_grad + the authors' five detection ABFs and HCL)
                  and torchvision's R18-FPN Faster R-CNN step alone;
  imagenet_f32    ImageNet resnet34 -> resnet18 at batch 256 in float32;
  *_torch_compile torch.compile (default mode) of the classification steps, last, as time
                  allows.
Classification items time the trainer's own step (`reviewkd_jax.bench.jax_step`) and the
authors' loop in PyTorch eager (`reviewkd_jax.bench.torch_step`, same initial weights) in
interleaved rounds, as `python -m reviewkd_jax.bench` does; each JAX row has the
compile time, median step (one by one) and the back-to-back step, images/s, peak device
memory, XLA's FLOPs per step and MFU, both against the peak of its dtype
(`bench/hardware.py`) and against the H200's dense bf16 peak (989 TFLOP/s) for every item.
FLOPs are XLA's cost analysis of the unoptimised step; jaxlib 0.11's GPU client gives none
for it (and the compiled program's analysis leaves out the cuDNN convolutions), so on a GPU
`--cpu_flops REPORT.json` adds them afterwards, counted on the CPU backend from the same
program. Peak memory: the compiled program's own for JAX (the device statistics also hold
the autotuner's scratch), the steady state after warm-up for PyTorch (its first step also
holds cuDNN's algorithm search).

Writes `<out>/gpu_h200_<label>.json` after every item (the report so far) and
`<out>/gpu_h200_<label>.log` (every subprocess's output); prints a table at the end. The
targets (2x PyTorch eager, ImageNet bf16 MFU >= 40%, compile < 60 s, detection no slower
than PyTorch) are printed, never asserted.

TensorFlow, tensorflow-datasets, clu and pycocotools are never imported: the steps run on
synthetic batches already on the device, and the modules that import those packages at the
top (the input pipelines, evaluation, logging) get a placeholder module whose every call
raises, so a step that used one would fail, not time something else. `--tiny` runs every item
at toy sizes (small batches, resnet8x4 <- resnet32x4 on CIFAR, R18 <- R18 detectors at
128x160) on whatever device there is: a smoke test of the script itself.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200_BF16_DENSE_PEAK = 989e12   # FLOP/s, the datasheet's dense bf16 (bench/hardware.py)
ABSENT_PACKAGES = ('tensorflow', 'tensorflow_datasets', 'clu', 'pycocotools')

# name: (kind, cap in seconds, settings, tiny settings). Order is priority.
ITEMS = {
    'probe': ('probe', 45, {}, {}),
    'imagenet_bf16': ('classification', 150,
                      dict(config='imagenet_r34_r18', batch_size=256, dtype='bfloat16'),
                      dict(config='imagenet_r34_r18', batch_size=2, dtype='bfloat16',
                           model='resnet18', teacher='resnet18')),
    'cifar_b128': ('classification', 90,
                   dict(config='cifar100_r32x4_r8x4', batch_size=128, dtype='bfloat16'),
                   dict(config='cifar100_r32x4_r8x4', batch_size=8, dtype='bfloat16')),
    'cifar_b1024': ('classification', 90,
                    dict(config='cifar100_r32x4_r8x4', batch_size=1024, dtype='bfloat16'),
                    dict(config='cifar100_r32x4_r8x4', batch_size=16, dtype='bfloat16')),
    'detection': ('detection', 180,
                  dict(pair='faster_r18_r101', images=2, image_size=(800, 1333),
                       pad_size=(800, 1344)),
                  dict(pair='faster_r18_r101', images=2, image_size=(128, 150),
                       pad_size=(128, 160), teacher_backbone='resnet18')),
    'imagenet_f32': ('classification', 150,
                     dict(config='imagenet_r34_r18', batch_size=256, dtype='float32'),
                     dict(config='imagenet_r34_r18', batch_size=2, dtype='float32',
                          model='resnet18', teacher='resnet18')),
    'imagenet_bf16_torch_compile': ('torch_compile', 150,
                                    dict(config='imagenet_r34_r18', batch_size=256,
                                         dtype='bfloat16', jax_item='imagenet_bf16'),
                                    dict(config='cifar100_r32x4_r8x4', batch_size=8,
                                         dtype='bfloat16', model='resnet8',
                                         teacher='resnet14', jax_item='cifar_b128')),
    'cifar_b128_torch_compile': ('torch_compile', 110,
                                 dict(config='cifar100_r32x4_r8x4', batch_size=128,
                                      dtype='bfloat16', jax_item='cifar_b128'),
                                 dict(config='cifar100_r32x4_r8x4', batch_size=8,
                                      dtype='bfloat16', model='resnet8', teacher='resnet14',
                                      jax_item='cifar_b128')),
}
MIN_ITEM_S = 40   # an item is started only with at least this much of the budget left,
MIN_START_S = {'torch_compile': 100}   # or this much for its kind


# ------------------------------------------------------------------------ placeholders


class _Absent:
  """An attribute of an absent package: further attributes are placeholders, calls raise."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return _Absent(f'{self._name}.{attr}')

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f'{self._name} was called, but this benchmark runs without that '
                       'package (synthetic on-device batches only)')

  def __repr__(self):
    return f'<absent {self._name}>'


class _AbsentModule(types.ModuleType):

  def __getattr__(self, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return _Absent(f'{self.__name__}.{attr}')


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Imports of ABSENT_PACKAGES (and their submodules) give placeholder modules."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name.split('.')[0] in ABSENT_PACKAGES:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _AbsentModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def install_placeholders():
  for name in list(sys.modules):
    if name.split('.')[0] in ABSENT_PACKAGES:
      raise RuntimeError(f'{name} is imported already')
  sys.meta_path.insert(0, _AbsentFinder())


# ---------------------------------------------------------------------------- child side


class Result:
  """The item's result dict, written atomically to its file after every phase."""

  def __init__(self, path: str):
    self.path, self.data = path, {'phases_done': []}

  def save(self, phase: str | None = None):
    if phase:
      self.data['phases_done'].append(phase)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.data, f, indent=1, default=_json_default)
    os.replace(tmp, self.path)


def _json_default(v):
  try:
    return float(v)
  except Exception:  # pylint: disable=broad-except
    return str(v)


def _left(deadline: float) -> float:
  return deadline - time.time()


def _log(msg: str):
  print(f'[{datetime.datetime.now().strftime("%H:%M:%S")}] {msg}', flush=True)


def _bf16_utilization(flops, step_s):
  if not flops or not step_s:
    return {}
  achieved = flops / step_s
  return {'achieved_tflops': achieved / 1e12, 'mfu_vs_h200_bf16_dense':
          achieved / H200_BF16_DENSE_PEAK}


def _reset_torch_peak(device: str):
  """Returns PyTorch's peak bytes so far (first step: cuDNN's algorithm search included)
  and starts a new peak, so that the report's peak is the steady-state step's."""
  if device != 'cuda':
    return None
  import torch  # pylint: disable=g-import-not-at-top
  peak = int(torch.cuda.max_memory_allocated())
  torch.cuda.reset_peak_memory_stats()
  return peak


def _step_peaks(steps_out: dict, torch_first_peak):
  """Sets 'step_peak_bytes' of each row: the compiled program's own peak (arguments +
  outputs not donated + temporaries) for JAX, whose device statistics' peak also holds the
  autotuner's scratch during compilation; PyTorch's steady-state peak."""
  for name, r in steps_out.items():
    mem = r.setdefault('memory', {})
    if name == 'jax':
      r['step_peak_bytes'] = mem.get('compiled_peak_bytes')
    else:
      r['step_peak_bytes'] = mem.get('device_peak_bytes')
      if torch_first_peak is not None:
        mem['first_steps_peak_bytes'] = torch_first_peak


def _torch_device():
  import jax  # pylint: disable=g-import-not-at-top
  return 'cuda' if jax.devices()[0].platform == 'gpu' else 'cpu'


class _Skipped(Exception):
  pass


def _torch_setup():
  """PyTorch settings of every torch row (recorded in the report)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.backends.cudnn.benchmark = True   # fixed shapes: let cuDNN pick its algorithms
  return {'torch': torch.__version__, 'cudnn_benchmark': True,
          'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
          'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32}


def _add_torch_eager(result: Result, settings: dict, runners: dict, build) -> None:
  """Adds `build()`, the PyTorch eager runner with its first step run, to `runners` as
  'torch_eager', or the reason it is absent to the report (`jax_only`, or the error `build`
  raised)."""
  try:
    if settings.get('jax_only'):
      raise _Skipped('JAX only')
    result.data['torch_settings'] = _torch_setup()
    runners['torch_eager'] = build()
  except _Skipped as e:
    result.data['torch_eager_skipped'] = str(e)
  except Exception as e:  # pylint: disable=broad-except
    result.data['torch_eager_error'] = f'{type(e).__name__}: {e}'
    traceback.print_exc()


def _timed_rounds(result: Result, runners: dict, *, warmup: int, rounds: int, per_round: int,
                  device: str):
  """Warms every runner up, then times `rounds` interleaved rounds of `per_round` steps each
  into the report (`bench.rounds`); returns PyTorch's peak memory before the timed steps."""
  from reviewkd_jax.bench import rounds as rounds_lib  # pylint: disable=g-import-not-at-top
  for r in runners.values():
    r.warmup(warmup)
  first_peak = _reset_torch_peak(device)
  result.data['rounds'] = rounds_lib.interleaved_rounds(runners, rounds * per_round, per_round)
  return first_peak


def _load_config(settings: dict):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{settings["config"]}').get_config()
  with config.unlocked():
    config.batch_size = settings['batch_size']
    config.dtype = settings['dtype']
    for key in ('model', 'teacher'):
      if key in settings:
        config[key] = settings[key]
  return config


def probe(result: Result, settings: dict, deadline: float):
  """The machine, the libraries and two bf16 matrix-product ceilings."""
  del settings
  import platform  # pylint: disable=g-import-not-at-top
  info = {'python': platform.python_version(), 'hostname_cores': os.cpu_count()}
  try:
    info['nvidia_smi'] = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,'
         'clocks.mem,power.draw,power.limit,temperature.gpu', '--format=csv'],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except Exception as e:  # pylint: disable=broad-except
    info['nvidia_smi'] = f'{type(e).__name__}: {e}'
  result.data['machine'] = info
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              optax=optax.__version__, devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind,
              xla_flags=os.environ.get('XLA_FLAGS', ''))
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info['torch'] = torch.__version__
    info['torch_cuda'] = torch.version.cuda
    info['cudnn'] = torch.backends.cudnn.version()
  except Exception as e:  # pylint: disable=broad-except
    info['torch'] = f'{type(e).__name__}: {e}'
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    info['torchvision'] = torchvision.__version__
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]], device=dev)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8], device=dev), 0.5)
    info['torchvision_nms'] = f'ok on {dev}: {keep.tolist()}'
  except Exception as e:  # pylint: disable=broad-except
    info['torchvision_nms'] = f'{type(e).__name__}: {str(e)[:300]}'
  result.save('versions')
  if _left(deadline) < 10 or jax.devices()[0].platform != 'gpu':
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  n, reps = 8192, 10
  ceilings = {}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    a = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
    b = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
    for _ in range(3):
      a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
      a @ b
    end.record()
    torch.cuda.synchronize()
    ceilings['torch_bf16_matmul_tflops'] = 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b
    torch.cuda.empty_cache()
  except Exception as e:  # pylint: disable=broad-except
    ceilings['torch_bf16_matmul'] = f'{type(e).__name__}: {e}'
  try:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    ceilings['jax_bf16_matmul_tflops'] = 2 * n**3 / float(np.median(times)) / 1e12
  except Exception as e:  # pylint: disable=broad-except
    ceilings['jax_bf16_matmul'] = f'{type(e).__name__}: {e}'
  result.data['ceilings'] = ceilings
  result.save('ceilings')


def classification(result: Result, settings: dict, deadline: float):
  """The config's JAX train step against the authors' loop in PyTorch eager, interleaved."""
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import hardware, jax_step  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import report as report_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import rounds as rounds_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.distill import reviewkd  # pylint: disable=g-import-not-at-top
  steps, rounds, warmup = settings.get('steps', 30), settings.get('rounds', 3), 3
  per_round = math.ceil(steps / rounds)
  config = _load_config(settings)
  result.data['config'] = {k: config.get(k) for k in (
      'dataset', 'model', 'teacher', 'method', 'batch_size', 'dtype', 'teacher_bn_mode',
      'student_features', 'teacher_features')}
  result.data['machine'] = {**hardware.describe()}
  t0 = time.perf_counter()
  step = jax_step.build(config, steps_per_epoch=per_round)
  result.data['build_s'] = time.perf_counter() - t0
  jr = jax_step.JaxRunner(step)
  host_variables = jax_step.initial_variables(step)
  teacher_host = jax.device_get(step.teacher_variables)
  _log(f'jax: compiling ({config.model} <- {config.teacher}, batch {config.batch_size}, '
       f'{config.dtype})')
  jr.compile()
  _log(f'jax: compiled in {jr.result["compile_s"]:.1f} s (trace {jr.result["trace_s"]:.1f} s)')
  result.data['jax_compile'] = dict(jr.result)
  result.save('jax_compile')

  runners = {'jax': jr}
  device = _torch_device()

  def torch_eager():
    from reviewkd_jax.bench import torch_step  # pylint: disable=g-import-not-at-top
    shape = (1, *step.spec.image_shape)
    levels = (reviewkd.feature_spec(step.model.student, shape, config.student_features),
              reviewkd.feature_spec(step.teacher, shape, config.teacher_features))
    first = jr.result['first_step_metrics']
    ts = torch_step.TorchStep(
        config, step.spec, student_variables=host_variables, teacher_variables=teacher_host,
        student_levels=levels[0], teacher_levels=levels[1], lr=first['lr'],
        lam=first.get('lambda', config.reviewkd_weight), device=device)
    runner = torch_step.TorchRunner(ts, step.host_batch)
    runner.compile()
    _log(f'torch eager: first step {runner.result["first_call_s"]:.1f} s')
    return runner

  _add_torch_eager(result, settings, runners, torch_eager)
  first_peak = _timed_rounds(result, runners, warmup=warmup, rounds=rounds,
                             per_round=per_round, device=device)
  steps_out = {name: r.summary() for name, r in runners.items()}
  _step_peaks(steps_out, first_peak)
  jax_r = steps_out['jax']
  jax_r.update(_bf16_utilization(jax_r['flops_per_step'], jax_r['pipelined_step_ms'] / 1e3))
  if 'torch_eager' in steps_out:
    te = steps_out['torch_eager']
    te.update(_bf16_utilization(jax_r['flops_per_step'], te['step']['median_ms'] / 1e3))
    te['flops_note'] = 'MFU from the JAX step\'s FLOPs (the same computation)'
    result.data['first_step_agreement'] = report_lib.loss_agreement(
        jax_r['first_step_metrics'], te['first_step_metrics'], ce_weight=config.ce_weight)
    result.data['speedup_vs_torch_eager'] = rounds_lib.speedups(
        result.data['rounds'])['torch_eager']
  result.data['steps'] = steps_out
  result.save('timed')
  _log(f'jax {jax_r["step"]["median_ms"]:.2f} ms/step (back to back '
       f'{jax_r["pipelined_step_ms"]:.2f}), {jax_r["images_per_s"]:.0f} img/s, MFU '
       f'{jax_r.get("mfu") or 0:.1%} of its dtype\'s peak; torch eager '
       f'{steps_out.get("torch_eager", {}).get("step", {}).get("median_ms", float("nan")):.2f} ms')
  del hardware


def torch_compile(result: Result, settings: dict, deadline: float):
  """torch.compile (default mode) of the authors' loop; the JAX step is only initialised."""
  del deadline
  import jax  # pylint: disable=g-import-not-at-top
  from reviewkd_jax import data  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import jax_step, torch_step  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.distill import reviewkd  # pylint: disable=g-import-not-at-top
  config = _load_config(settings)
  result.data['config'] = {k: config.get(k) for k in ('dataset', 'model', 'teacher',
                                                      'batch_size', 'dtype')}
  result.data['torch_settings'] = _torch_setup()
  step = jax_step.build(config, steps_per_epoch=10)
  host_variables = jax_step.initial_variables(step)
  teacher_host = jax.device_get(step.teacher_variables)
  shape = (1, *step.spec.image_shape)
  ts = torch_step.TorchStep(
      config, step.spec, student_variables=host_variables, teacher_variables=teacher_host,
      student_levels=reviewkd.feature_spec(step.model.student, shape, config.student_features),
      teacher_levels=reviewkd.feature_spec(step.teacher, shape, config.teacher_features),
      lr=config.learning_rate, lam=config.reviewkd_weight, device=_torch_device(),
      compile_mode='compile')
  del step
  result.save('built')
  runner = torch_step.TorchRunner(ts, jax_step.synthetic_batch(
      data.get_spec(config.dataset), config.batch_size))
  _log('torch.compile: first step (compiling)')
  runner.compile()
  _log(f'torch.compile: first step {runner.result["first_call_s"]:.1f} s')
  result.data['torch_compile_first'] = dict(runner.result)
  result.save('torch_compile_first')
  runner.warmup(3)
  first_peak = _reset_torch_peak(_torch_device())
  runner.run_synced(settings.get('steps', 20))
  result.data['steps'] = {'torch_compile': runner.summary()}
  _step_peaks(result.data['steps'], first_peak)
  result.save('timed')


# ------------------------------------------------------------------------ detection


def _detection_batch(images: int, image_size, pad_size, max_boxes: int, num_classes: int,
                     seed: int = 0):
  """A detection batch of `detection/data.py`'s training format: random RGB images at the
  top left of the padding, 8 random ground-truth boxes per image."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, w = image_size
  image = np.zeros((images, *pad_size, 3), np.float32)
  image[:, :h, :w] = rng.integers(0, 256, (images, h, w, 3)).astype(np.float32)
  boxes = np.zeros((images, max_boxes, 4), np.float32)
  valid = np.zeros((images, max_boxes), bool)
  labels = np.zeros((images, max_boxes), np.int32)
  for i in range(images):
    for g in range(8):
      bw, bh = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
      x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      boxes[i, g] = (x1, y1, x1 + bw, y1 + bh)
      valid[i, g] = True
      labels[i, g] = rng.integers(0, num_classes)
  return {'image': image, 'image_size': np.tile(np.asarray(image_size, np.int32), (images, 1)),
          'boxes': boxes, 'labels': labels, 'gt_valid': valid}


class _DetJaxRunner:
  """The detection train step (`train.detection.make_detector_train_step`), compiled and timed."""

  def __init__(self, settings: dict, tiny: bool):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from configs import coco_distill  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.bench.jax_step import draw_variables  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.detection import model as model_lib  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.train import detection as det_train  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    config = coco_distill.get_config(f'pair={settings["pair"]},method=reviewkd')
    with config.unlocked():
      config.batch_size = settings['images']
      config.pad_size = tuple(settings['pad_size'])
      if 'teacher_backbone' in settings:
        config.teacher_backbone = settings['teacher_backbone']
    self.config = config
    num_classes = 80
    mesh = state_lib.make_mesh(None)
    module = model_lib.RCNN(det_train.detector_config(config, num_classes))
    teacher = model_lib.RCNN(det_train.detector_config(config, num_classes, teacher=True))
    image = jnp.zeros((1, *config.pad_size, 3), jnp.float32)
    teacher_variables = draw_variables(model_lib.abstract_variables(teacher), 1)
    teacher_shapes = jax.eval_shape(
        lambda v: teacher.apply(v, image, method=model_lib.RCNN.features), teacher_variables)
    variables = draw_variables(model_lib.abstract_variables(module), 0)
    student_shapes = jax.eval_shape(
        lambda v: module.apply(v, image, method=model_lib.RCNN.features), variables)
    adapter = det_train.build_adapter(config,
                                      {k: v.shape[-1] for k, v in teacher_shapes.items()})
    from reviewkd_jax.detection import distill as det_distill  # pylint: disable=g-import-not-at-top
    zeros = [jax.ShapeDtypeStruct(student_shapes[k].shape, student_shapes[k].dtype)
             for k in det_distill.LEVELS]
    distill_vars = draw_variables(jax.eval_shape(
        lambda: adapter.init(jax.random.key(2), [jnp.zeros(z.shape, z.dtype) for z in zeros],
                             train=False)), 2)
    params = {'student': variables.pop('params'), 'distill': distill_vars.pop('params', {})}
    model_state = {'student': variables, 'distill': distill_vars}
    tx, schedule = det_train.make_detector_optimizer(config, params)
    rep = state_lib.replicated(mesh)
    self.state = jax.device_put(state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(1))), rep)
    self.teacher_variables = jax.device_put(teacher_variables, rep)
    self.host_batch = _detection_batch(settings['images'], settings['image_size'],
                                       config.pad_size, config.max_boxes, num_classes)
    self.batch = jax.device_put(self.host_batch, state_lib.batch_sharded(mesh))
    self.train_step = det_train.make_detector_train_step(module, tx, schedule, mesh,
                                                         config=config, teacher=teacher,
                                                         adapter=adapter)
    self.mesh = mesh
    self.synced, self.pipelined = [], []

  def compile(self) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.bench import jax_step  # pylint: disable=g-import-not-at-top
    args = (self.state, self.batch, self.teacher_variables)
    lowered, compiled, trace_s, compile_s = jax_step.lower_and_compile(self.train_step, args)
    t0 = time.perf_counter()
    self.state, metrics = self.train_step(*args)
    first = {k: float(v) for k, v in jax.device_get(metrics).items()}
    first_s = time.perf_counter() - t0
    try:
      lowered_cost = repr(lowered.cost_analysis())[:300]
    except Exception as e:  # pylint: disable=broad-except
      lowered_cost = f'{type(e).__name__}: {str(e)[:300]}'
    return {'trace_s': trace_s, 'compile_s': compile_s, 'first_call_s': first_s,
            'flops_per_step': jax_step._flops(lowered),  # pylint: disable=protected-access
            'lowered_cost_analysis': lowered_cost,
            'memory': jax_step._memory(compiled),  # pylint: disable=protected-access
            'first_step_metrics': first}

  def _call(self):
    self.state, metrics = self.train_step(self.state, self.batch, self.teacher_variables)
    return metrics

  def warmup(self, n):
    import jax  # pylint: disable=g-import-not-at-top
    for _ in range(n):
      m = self._call()
    jax.block_until_ready(m)

  def run_synced(self, n):
    import jax  # pylint: disable=g-import-not-at-top
    for _ in range(n):
      t0 = time.perf_counter()
      self._last = jax.block_until_ready(self._call())
      self.synced.append(time.perf_counter() - t0)

  def run_pipelined(self, n):
    import jax  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    for _ in range(n):
      m = self._call()
    self._last = jax.block_until_ready(m)
    self.pipelined.append((time.perf_counter() - t0) / n)


class _DetTorchRunner:
  """The same computation on torchvision's Faster R-CNN: the R18-FPN student's training step
  (`transform` -> `backbone` -> `rpn` -> `roi_heads` losses), the R101-FPN teacher pyramid
  under no_grad, the authors' five detection ABFs (`testing.torch_reviewkd.DetectionReviewKD`)
  and `lambda * hcl` against the teacher's P2..P6, SGD(momentum 0.9, weight decay 1e-4).
  `distill=False`: torchvision's Faster R-CNN training step alone (no teacher, no ABFs).
  The learning rate is constant at the JAX step's first (warm-up) value."""

  def __init__(self, settings: dict, host_batch: dict, *, distill: bool, lam: float,
               lr: float, device: str):
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.testing import torch_reviewkd  # pylint: disable=g-import-not-at-top
    if device == 'cpu':
      from reviewkd_jax.testing import torch_detection  # pylint: disable=g-import-not-at-top
      torch_detection.detection_models()   # a Python nms where the wheel has no CPU kernel
    from torchvision.models.detection import FasterRCNN  # pylint: disable=g-import-not-at-top
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    self.device, self.distill, self.lam, self.hcl = torch.device(device), distill, lam, \
        torch_reviewkd.hcl
    h, w = settings['image_size']
    # freeze_at=2 (stem + res2 frozen, every body BN frozen) = trainable_layers=3.
    backbone = resnet_fpn_backbone(backbone_name='resnet18', weights=None, trainable_layers=3)
    self.model = FasterRCNN(backbone, num_classes=81, min_size=min(h, w), max_size=max(h, w),
                            rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
                            box_batch_size_per_image=512).to(self.device).train()
    params = [p for p in self.model.parameters() if p.requires_grad]
    if distill:
      self.teacher = resnet_fpn_backbone(
          backbone_name=settings.get('teacher_backbone', 'resnet101'), weights=None,
          trainable_layers=0).to(self.device).eval()
      for p in self.teacher.parameters():
        p.requires_grad_(False)
      # Random weights without normalisation grow ~2x per residual block (R101's pyramid
      # reaches ~1e4 and the HCL term ~1e10, and the student diverges to NaN within steps);
      # the last frozen BN of each residual branch at 0.1 keeps the pyramid O(0.1-1), as
      # trained weights are. Same computation, finite losses.
      with torch.no_grad():
        for block in self.teacher.body.modules():
          last_bn = getattr(block, 'bn3', None) or getattr(block, 'bn2', None)
          if last_bn is not None and hasattr(block, 'conv1'):
            last_bn.weight.mul_(0.1)
      self.kd_trans = torch_reviewkd.DetectionReviewKD().to(self.device).train()
      params += list(self.kd_trans.parameters())
    # The JAX step's first learning rate (Detectron2's warm-up starts at 0.001x): from
    # random weights, the recipe's full lr (0.01) diverges to NaN within a few steps.
    self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    # Each image at its true size (torchvision pads the batch to a multiple of 32 itself).
    self.images = [torch.from_numpy(np.ascontiguousarray(
        host_batch['image'][i, :h, :w].transpose(2, 0, 1) / 255.0)).float().to(self.device)
                   for i in range(host_batch['image'].shape[0])]
    self.targets = []
    for i in range(len(self.images)):
      v = host_batch['gt_valid'][i]
      self.targets.append({
          'boxes': torch.from_numpy(host_batch['boxes'][i][v]).to(self.device),
          'labels': torch.from_numpy(host_batch['labels'][i][v].astype(np.int64) + 1).to(
              self.device)})
    self.synced = []
    self.result = {}

  def __call__(self):
    import torch  # pylint: disable=g-import-not-at-top
    m = self.model
    images, targets = m.transform(self.images, self.targets)
    feats = m.backbone(images.tensors)
    proposals, rpn_losses = m.rpn(images, feats, targets)
    _, roi_losses = m.roi_heads(feats, proposals, images.image_sizes, targets)
    losses = {**rpn_losses, **roi_losses}
    if self.distill:
      with torch.no_grad():
        tfeats = list(self.teacher(images.tensors).values())
      outs = self.kd_trans(list(feats.values()))
      losses['loss_reviewkd'] = self.lam * self.hcl(outs, tfeats)
    loss = sum(losses.values())
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    return {k: v.item() for k, v in {'loss': loss, **losses}.items()}

  def _sync(self):
    import torch  # pylint: disable=g-import-not-at-top
    if self.device.type == 'cuda':
      torch.cuda.synchronize(self.device)

  def compile(self):
    import torch  # pylint: disable=g-import-not-at-top
    if self.device.type == 'cuda':
      torch.cuda.reset_peak_memory_stats(self.device)
    t0 = time.perf_counter()
    first = self()
    self._sync()
    self.result = {'first_call_s': time.perf_counter() - t0, 'first_step_metrics': first}
    return self.result

  def warmup(self, n):
    for _ in range(n):
      self()
    self._sync()

  def run_synced(self, n):
    for _ in range(n):
      t0 = time.perf_counter()
      self._last = self()
      self._sync()
      self.synced.append(time.perf_counter() - t0)

  def summary(self, batch_size: int) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from reviewkd_jax.bench import jax_step  # pylint: disable=g-import-not-at-top
    stats = jax_step.summarize(self.synced)
    memory = {}
    if self.device.type == 'cuda':
      memory['device_peak_bytes'] = int(torch.cuda.max_memory_allocated(self.device))
    return {**self.result, 'step': stats, 'pipelined_step_ms': stats['median_ms'],
            'images_per_s': batch_size / (stats['median_ms'] / 1e3), 'memory': memory,
            'last_step_metrics': self._last,
            'finite': bool(all(np.isfinite(v) for v in self._last.values()))}


def detection(result: Result, settings: dict, deadline: float):
  """Faster R-CNN R18-FPN <- R101-FPN ReviewKD: the JAX step, PyTorch eager, torchvision."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import hardware, jax_step  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import rounds as rounds_lib  # pylint: disable=g-import-not-at-top
  tiny = settings.get('tiny', False)
  steps, rounds = settings.get('steps', 12), settings.get('rounds', 3)
  per_round = steps // rounds
  result.data['machine'] = hardware.describe()
  t0 = time.perf_counter()
  jr = _DetJaxRunner(settings, tiny)
  result.data['build_s'] = time.perf_counter() - t0
  c = jr.config
  result.data['config'] = {
      'pair': settings['pair'], 'method': c.method, 'backbone': c.backbone,
      'teacher_backbone': c.teacher_backbone, 'images': c.batch_size,
      'image_size': list(settings['image_size']), 'pad_size': list(c.pad_size),
      'dtype': 'float32', 'convention': c.convention, 'reviewkd_weight': c.reviewkd_weight,
      'rpn_pre_nms_topk': list(c.rpn_pre_nms_topk),
      'rpn_post_nms_topk': list(c.rpn_post_nms_topk),
      'roi_batch_size_per_image': c.roi_batch_size_per_image}
  _log('jax detection: compiling')
  compiled = jr.compile()
  _log(f'jax detection: compiled in {compiled["compile_s"]:.1f} s')
  result.data['jax_compile'] = compiled
  result.save('jax_compile')
  runners = {'jax': jr}
  device = _torch_device()

  def torch_eager():
    tr = _DetTorchRunner(settings, jr.host_batch, distill=True, lam=c.reviewkd_weight,
                         lr=compiled['first_step_metrics']['lr'], device=device)
    tr.compile()
    _log(f'torch detection: first step {tr.result["first_call_s"]:.1f} s')
    return tr

  _add_torch_eager(result, settings, runners, torch_eager)
  first_peak = _timed_rounds(result, runners, warmup=2, rounds=rounds, per_round=per_round,
                             device=device)
  stats = jax_step.summarize(jr.synced)
  pipelined_s = float(np.median(jr.pipelined))
  last = {k: float(v) for k, v in jax.device_get(jr._last).items()}
  jax_r = {**compiled, 'step': stats, 'pipelined_step_ms': pipelined_s * 1e3,
           'images_per_s': c.batch_size / pipelined_s, 'last_step_metrics': last,
           'finite': bool(all(np.isfinite(v) for v in last.values())), 'dtype': 'float32',
           'batch_size': c.batch_size}
  jax_r['memory'] = {**compiled['memory'], **hardware.device_memory()}
  jax_r.update(hardware.utilization(compiled['flops_per_step'], pipelined_s, 'float32', 1))
  jax_r.update(_bf16_utilization(compiled['flops_per_step'], pipelined_s))
  steps_out = {'jax': jax_r}
  if 'torch_eager' in runners:
    te = runners['torch_eager'].summary(c.batch_size)
    te.update(_bf16_utilization(compiled['flops_per_step'], te['step']['median_ms'] / 1e3))
    te['framework'] = 'torchvision Faster R-CNN + R101-FPN teacher + DetectionReviewKD, eager'
    steps_out['torch_eager'] = te
    result.data['speedup_vs_torch_eager'] = rounds_lib.speedups(
        result.data['rounds'])['torch_eager']
  _step_peaks(steps_out, first_peak)
  result.data['steps'] = steps_out
  result.save('timed')
  _log(f'jax detection {stats["median_ms"]:.1f} ms/step; torch '
       f'{steps_out.get("torch_eager", {}).get("step", {}).get("median_ms", float("nan")):.1f} ms')
  if 'torch_eager' in runners and _left(deadline) > 20:
    runners.pop('torch_eager')
    import torch  # pylint: disable=g-import-not-at-top
    if device == 'cuda':
      torch.cuda.empty_cache()
    try:
      alone = _DetTorchRunner(settings, jr.host_batch, distill=False, lam=0.0, lr=lr,
                              device=device)
      alone.compile()
      alone.warmup(2)
      first_peak = _reset_torch_peak(device)
      alone.run_synced(steps)
      s = alone.summary(c.batch_size)
      _step_peaks({'torch': s}, first_peak)
      s['framework'] = 'torchvision Faster R-CNN R18-FPN training step alone, eager'
      result.data['steps']['torchvision_student_alone'] = s
    except Exception as e:  # pylint: disable=broad-except
      result.data['torchvision_student_alone_error'] = f'{type(e).__name__}: {e}'
      traceback.print_exc()
    result.save('torchvision_alone')


def cpu_flops(report_path: str):
  """Adds XLA's FLOPs of each JAX step in a report, counted on this machine's CPU backend
  (the unoptimised program, lowered only, never compiled: the count does not depend on the
  device), and the utilisation figures that follow from them and the measured times."""
  install_placeholders()
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.bench import hardware, jax_step  # pylint: disable=g-import-not-at-top
  with open(report_path) as f:
    report = json.load(f)
  peaks = {'bfloat16': 989e12, 'float32': 494.5e12}   # H200 dense, bench/hardware.py
  for name, item in report['items'].items():
    steps = item.get('steps', {})
    if 'jax' not in steps:
      continue
    settings = dict(item['settings'])
    t0 = time.time()
    if item['kind'] == 'classification':
      step = jax_step.build(_load_config(settings), steps_per_epoch=10,
                            devices=jax.devices('cpu'))
      lowered = step.train_step.lower(step.state, step.batch, step.teacher_variables)
      dtype = settings['dtype']
    else:
      runner = _DetJaxRunner(settings, False)
      lowered = runner.train_step.lower(runner.state, runner.batch, runner.teacher_variables)
      dtype = 'float32'
    flops = jax_step._flops(lowered)  # pylint: disable=protected-access
    print(f'{name}: {flops / 1e9:.1f} GFLOP/step ({time.time() - t0:.0f} s)', flush=True)
    for fw, r in steps.items():
      if fw != 'jax':
        r['flops_note'] = "utilisation from the JAX step's FLOPs (the same computation)"
      if fw == 'jax':
        r['flops_per_step_device'] = r.get('flops_per_step')
        r['flops_source_device'] = r.get('flops_source')
        r['flops_per_step'] = flops
        r['flops_source'] = f'CPU lowering, jax {jax.__version__} / jaxlib {jaxlib.__version__}'
      step_s = r['pipelined_step_ms'] / 1e3
      r.update(_bf16_utilization(flops, step_s))
      r['mfu'] = flops / step_s / peaks[dtype]
      r['achieved_flops_per_s'] = flops / step_s
  del hardware
  report['targets'] = targets(report)
  with open(report_path, 'w') as f:
    json.dump(report, f, indent=1, default=_json_default)
  print(table(report))
  for t in report['targets']:
    print('target', t)


CHILDREN = {'probe': probe, 'classification': classification, 'detection': detection,
            'torch_compile': torch_compile}


def child_main(args):
  install_placeholders()
  sys.path.insert(0, ROOT)
  result = Result(args.result)
  base, _, variant = args.child.partition('@')
  kind, _, settings, tiny_settings = ITEMS[base]
  settings = dict(tiny_settings if args.tiny else settings)
  if args.tiny:
    settings.update(tiny=True, steps=4, rounds=2)
  if variant == 'noflags':
    settings['jax_only'] = True
  result.data.update(item=args.child, kind=kind, settings=settings,
                     started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec='seconds'))
  try:  # torchvision with its own compiled ops first: `reviewkd_jax.testing.torchvision()`
    # declares CPU-only stand-ins for them when it imports torchvision itself.
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except
    result.data['torchvision_import_error'] = f'{type(e).__name__}: {e}'
  t0 = time.time()
  try:
    CHILDREN[kind](result, settings, args.deadline)
  except Exception as e:  # pylint: disable=broad-except
    result.data['error'] = f'{type(e).__name__}: {e}'
    result.data['traceback'] = traceback.format_exc()[-4000:]
    traceback.print_exc()
  result.data['item_s'] = time.time() - t0
  result.save()
  leaked = [m for m in sys.modules if m.split('.')[0] in ABSENT_PACKAGES]
  result.data['placeholder_modules'] = sorted(leaked)
  result.save()


# --------------------------------------------------------------------------- parent side


def _fmt(v, spec, scale=1.0):
  return '-' if v is None else format(v * scale, spec)


def _row(name, r, jax_ms=None):
  step = r.get('step', {})
  ms = step.get('median_ms')
  mem = r.get('memory', {})
  peak = r.get('step_peak_bytes', mem.get('compiled_peak_bytes', mem.get('device_peak_bytes')))
  comp = r.get('compile_s', r.get('first_call_s'))
  vs = (ms / jax_ms) if (ms and jax_ms) else None
  return (f'{name:<34}{_fmt(comp, ".1f"):>9}{_fmt(ms, ".2f"):>10}'
          f'{_fmt(r.get("pipelined_step_ms"), ".2f"):>10}{_fmt(r.get("images_per_s"), ".0f"):>9}'
          f'{_fmt(peak, ".2f", 2**-30):>9}{_fmt(r.get("flops_per_step"), ".0f", 1e-9):>9}'
          f'{_fmt(r.get("achieved_tflops"), ".1f"):>9}{_fmt(r.get("mfu"), ".1%"):>8}'
          f'{_fmt(r.get("mfu_vs_h200_bf16_dense"), ".1%"):>9}{_fmt(vs, ".2f"):>8}')


def table(report: dict) -> str:
  lines = [f'{"item / framework":<34}{"compile":>9}{"med ms":>10}{"b2b ms":>10}{"img/s":>9}'
           f'{"peak GiB":>9}{"GFLOP":>9}{"TFLOP/s":>9}{"MFU dt":>8}{"MFU bf16":>9}'
           f'{"JAX x":>8}']
  for name, item in report['items'].items():
    if item.get('kind') == 'probe':
      continue
    if 'steps' not in item:
      lines.append(f'{name:<34}{item.get("status", "")} {item.get("error", "")[:100]}')
      continue
    jax_ms = item['steps'].get('jax', {}).get('step', {}).get('median_ms')
    if item.get('kind') == 'torch_compile':
      src = report['items'].get(item['settings'].get('jax_item', ''), {})
      jax_ms = src.get('steps', {}).get('jax', {}).get('step', {}).get('median_ms')
    for fw, r in item['steps'].items():
      lines.append(_row(f'{name}/{fw}', r, None if fw == 'jax' else jax_ms))
    if item.get('error'):
      lines.append(f'  error: {item["error"][:150]}')
  return '\n'.join(lines)


def targets(report: dict) -> list[str]:
  out = []
  for name, item in report['items'].items():
    steps = item.get('steps', {})
    if 'jax' in steps and 'torch_eager' in steps:
      sp = steps['torch_eager']['step']['median_ms'] / steps['jax']['step']['median_ms']
      want = 1.0 if name == 'detection' else 2.0
      out.append(f'{name}: JAX step {sp:.2f}x PyTorch eager (target >= {want:g}x): '
                 f'{"met" if sp >= want else "NOT met"}')
    if 'jax' in steps:
      comp = steps['jax'].get('compile_s')
      if comp is not None:
        out.append(f'{name}: compile {comp:.1f} s (target < 60 s): '
                   f'{"met" if comp < 60 else "NOT met"}')
    if name == 'imagenet_bf16' and 'jax' in steps:
      mfu = steps['jax'].get('mfu')
      out.append(f'{name}: MFU {_fmt(mfu, ".1%")} (target >= 40%): '
                 f'{"met" if mfu and mfu >= 0.4 else "NOT met"}')
  return out


def parent_main(args):
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, f'gpu_h200_{args.label}.json')
  log_path = os.path.join(args.out, f'gpu_h200_{args.label}.log')
  work = os.path.join('/tmp', f'gpu_h200_{args.label}_{os.getpid()}')
  os.makedirs(work, exist_ok=True)
  start = time.time()
  deadline = start + args.budget_s
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')   # the rest for PyTorch
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  env['PYTHONUNBUFFERED'] = '1'
  env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  base_env = dict(env)
  if args.xla_flags:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  names = args.items.split(',') if args.items else list(ITEMS)
  report = {'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
            'extra_xla_flags': args.xla_flags,
            'label': args.label,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'budget_s': args.budget_s, 'tiny': args.tiny,
            'env': {k: env.get(k, '') for k in ('XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                                'XLA_PYTHON_CLIENT_PREALLOCATE')},
            'items': {}}

  def save():
    with open(json_path, 'w') as f:
      json.dump(report, f, indent=1, default=_json_default)

  with open(log_path, 'a') as log:
    for name in names:
      left = deadline - time.time()
      base, _, variant = name.partition('@')
      if base not in ITEMS or variant not in ('', 'noflags'):
        raise SystemExit(f'unknown item {name!r}: {", ".join(ITEMS)}, each optionally with '
                         "'@noflags' (JAX only, without --xla_flags: the control of a flag)")
      kind, cap, _, _ = ITEMS[base]
      item_env = env if variant != 'noflags' else base_env
      if left < MIN_START_S.get(kind, MIN_ITEM_S):
        report['items'][name] = {'kind': kind, 'status': f'skipped: {left:.0f} s of the '
                                 'budget left'}
        print(f'{name}: skipped ({left:.0f} s left)', flush=True)
        save()
        continue
      timeout = min(cap * (3 if args.tiny else 1), left)   # toy sizes on a CPU run slower
      result_path = os.path.join(work, f'{name}.json')
      cmd = [sys.executable, os.path.abspath(__file__), '--child', name, '--result',
             result_path, '--deadline', str(time.time() + timeout - 5)]
      if args.tiny:
        cmd.append('--tiny')
      log.write(f'\n===== {name} (timeout {timeout:.0f} s): {" ".join(cmd)}\n')
      log.flush()
      t0 = time.time()
      try:
        proc = subprocess.run(cmd, cwd=ROOT, env=item_env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
        status = 'ok' if proc.returncode == 0 else f'exit {proc.returncode}'
      except subprocess.TimeoutExpired:
        status = f'timed out after {timeout:.0f} s (partial results kept)'
      wall = time.time() - t0
      try:
        with open(result_path) as f:
          item = json.load(f)
      except (OSError, ValueError) as e:
        item = {'error': f'no result file: {e}'}
      item.update(kind=kind, status=status, wall_s=wall)
      if 'error' in item and status == 'ok':
        item['status'] = 'failed'
      report['items'][name] = item
      report['elapsed_s'] = time.time() - start
      save()
      print(f'{name}: {item["status"]} in {wall:.0f} s'
            + (f' ({item["error"][:200]})' if 'error' in item else ''), flush=True)
  report['targets'] = targets(report)
  report['elapsed_s'] = time.time() - start
  save()
  probe_item = report['items'].get('probe', {})
  print(json.dumps({k: probe_item.get(k) for k in ('machine', 'ceilings')}, default=str)[:2000])
  print(table(report))
  for t in report['targets']:
    print('target', t)
  print(f'wrote {json_path} and {log_path} in {report["elapsed_s"]:.0f} s', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.environ.get('OUT', '/tmp/gpu_h200'))
  parser.add_argument('--label', default='run')
  parser.add_argument('--budget_s', type=float, default=390)
  parser.add_argument('--items', default='', help='comma-separated subset of ' + ','.join(ITEMS))
  parser.add_argument('--xla_flags', default='', help='appended to XLA_FLAGS in every item')
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--result', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--deadline', type=float, default=0.0, help=argparse.SUPPRESS)
  parser.add_argument('--cpu_flops', default=None, metavar='REPORT.json',
                      help="add XLA's FLOPs per step, counted on the CPU backend, and the "
                      'MFU that follows to a report (where the GPU client gave none)')
  args = parser.parse_args()
  if args.cpu_flops:
    cpu_flops(args.cpu_flops)
  elif args.child:
    child_main(args)
  else:
    parent_main(args)


if __name__ == '__main__':
  main()
