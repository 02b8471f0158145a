"""The same distillation step in PyTorch, written the way the authors' training loop runs it.

The pair comes from `reviewkd_jax.testing` (the CRD/torchvision backbones and the
authors' `ABF`, `ReviewKD` wrapper and `hcl`), loaded with the JAX side's initial weights, so
the first step's losses of both frameworks can be compared. One step is the authors' loop
body: teacher forward under `no_grad` (train mode when the config keeps the teacher's BN in
batch statistics, as their CIFAR script does; eval mode otherwise), student + ABFs forward,
`CE + lambda * HCL` (+ the KD term if configured), `zero_grad / backward / step` with
`SGD(momentum, nesterov, weight_decay)`, and top-1/top-5 accuracy, `loss.item()` as their loop
logs them. Images arrive as uint8 NCHW on the device and are normalised in the step, like the
JAX step. bfloat16 configs run under `torch.autocast` (the authors' ImageNet script uses AMP).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from reviewkd_jax import convert
from reviewkd_jax import testing as torch_reference
from reviewkd_jax.testing import torch_reviewkd as authors


class _Backbone(torch.nn.Module):
  """A reference backbone whose forward returns the authors' `(levels incl. pooled, logits)`."""

  def __init__(self, model: torch.nn.Module, forward: Callable, kind: str):
    super().__init__()
    self.model, self._forward, self._kind = model, forward, kind

  def forward(self, x):
    logits, feats = self._forward(self.model, x)
    pooled = feats['pooled']
    return [*feats[self._kind], pooled.view(*pooled.shape, 1, 1)], logits


def _resnet_forward_once(model, x):
  """Returns (logits, features) of a torchvision ResNet in one pass (the reference's
  `resnet_forward` runs the network twice to check itself; a benchmark must not)."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  feats = {'stem': x, 'stages': [], 'preact': []}
  for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
    for block in layer[:-1]:
      x = block(x)
    pre = _residual_sum(layer[-1], x)
    x = torch.relu(pre)
    feats['preact'].append(pre)
    feats['stages'].append(x)
  feats['pooled'] = torch.flatten(model.avgpool(x), 1)
  return model.fc(feats['pooled']), feats


def _residual_sum(block, x):
  from reviewkd_jax.testing import torch_imagenet as imagenet  # pylint: disable=g-import-not-at-top
  return imagenet._residual_sum(block, x)  # pylint: disable=protected-access


def _mobilenet_forward_once(model, x):
  """Returns (logits, features) of the authors' MobileNet in one pass."""
  x = model.model[0](x)
  feats = {'stem': x, 'stages': [], 'preact': []}
  for i in range(1, 14):
    if i in model.FEATURE_BLOCKS:
      pre = model.model[i][:-1](x)
      x = torch.relu(pre)
      feats['preact'].append(pre)
      feats['stages'].append(x)
    else:
      x = model.model[i](x)
  feats['pooled'] = torch.flatten(model.model[14](x), 1)
  return model.fc(feats['pooled']), feats


def build_backbone(name: str, num_classes: int):
  """Returns (model, single-pass forward) of a reference backbone."""
  model, forward = torch_reference.build(name, num_classes)
  if name in ('resnet18', 'resnet34', 'resnet50', 'resnet101'):
    forward = _resnet_forward_once
  elif name == 'mobilenet_v1':
    forward = _mobilenet_forward_once
  return model, forward


def _load(module: torch.nn.Module, state_dict: dict):
  """Loads numpy arrays into `module`; only BN's `num_batches_tracked` may be missing."""
  missing, unexpected = module.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
      strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'PyTorch module does not fit the JAX variables: missing {missing[:5]}, '
                     f'unexpected {unexpected[:5]}')


def _accuracy(logits, labels, topk=(1, 5)):
  """The authors' `accuracy`: top-k precision in percent."""
  maxk = min(max(topk), logits.shape[1])
  _, pred = logits.topk(maxk, 1, True, True)
  correct = pred.t().eq(labels.view(1, -1).expand_as(pred.t()))
  return [correct[:min(k, maxk)].reshape(-1).float().sum(0) * (100.0 / labels.shape[0])
          for k in topk]


class TorchStep:
  """One ReviewKD training step of a config's pair in PyTorch (eager or torch.compile)."""

  def __init__(self, config, spec, *, student_variables: dict, teacher_variables: dict,
               student_levels: tuple[list[int], list[tuple[int, int]]],
               teacher_levels: tuple[list[int], list[tuple[int, int]]],
               lr: float, lam: float, device: str = 'cpu', compile_mode: str | None = None,
               threads: int | None = None):
    if config.method != 'reviewkd':
      raise ValueError(f'the PyTorch step implements method "reviewkd", not {config.method!r}')
    if threads:
      torch.set_num_threads(threads)
    self.config, self.device = config, torch.device(device)
    self.compile_mode = compile_mode
    s_channels, s_sizes = student_levels
    t_channels, t_sizes = teacher_levels
    backbone, s_forward = build_backbone(config.model, spec.num_classes)
    self.model = authors.ReviewKD(
        _Backbone(backbone, s_forward, config.student_features),
        in_channels=s_channels, out_channels=t_channels,
        shapes=[h for h, _ in reversed(s_sizes)], out_shapes=[h for h, _ in reversed(t_sizes)],
        mid_channel=config.mid_channels or min(512, s_channels[-1]))
    student_sd = {(('student.model.' + k[len('student.'):]) if k.startswith('student.') else k):
                  v for k, v in convert.flax_to_torch(student_variables).items()}
    _load(self.model, student_sd)
    teacher, t_forward = build_backbone(config.teacher, spec.num_classes)
    self.teacher = _Backbone(teacher, t_forward, config.teacher_features)
    _load(self.teacher.model, convert.flax_to_torch(teacher_variables))
    self.model.to(self.device).train()
    self.teacher.to(self.device).train(config.teacher_bn_mode == 'batch_stats')
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr,
                                     momentum=config.momentum,
                                     nesterov=bool(config.nesterov),
                                     weight_decay=config.weight_decay)
    self.lam = lam
    self.mean = torch.tensor(spec.mean, device=self.device).view(1, -1, 1, 1)
    self.std = torch.tensor(spec.std, device=self.device).view(1, -1, 1, 1)
    self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                     if config.dtype == 'bfloat16' else contextlib.nullcontext())
    self._losses = self._losses_eager
    if compile_mode:
      mode = None if compile_mode in ('compile', 'default') else compile_mode
      self._losses = torch.compile(self._losses_eager, mode=mode)

  def _losses_eager(self, images_u8, labels):
    x = (images_u8.float() / 255.0 - self.mean) / self.std
    with self.autocast:
      with torch.no_grad():
        t_levels, t_logits = self.teacher(x)
      s_levels, logits = self.model(x)
      logits = logits.float()
      ce = F.cross_entropy(logits, labels)
      hcl = authors.hcl([f.float() for f in s_levels], [f.float() for f in t_levels])
      loss = self.config.ce_weight * ce + self.lam * hcl
      if self.config.kd_weight:
        t = self.config.kd_temperature
        kd = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(t_logits.float() / t, 1),
                      reduction='batchmean') * t * t
        loss = loss + self.config.kd_weight * kd
    return loss, ce, hcl, logits

  def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict:
    """Runs one training step; returns the loss terms and accuracies as Python floats."""
    loss, ce, hcl, logits = self._losses(images_u8, labels)
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    top1, top5 = _accuracy(logits.detach(), labels)
    return {'loss': loss.item(), 'ce': ce.item(), 'hcl': hcl.item(), 'top1': top1.item(),
            'top5': top5.item()}

  def to_device(self, host_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the uint8 NHWC numpy batch as (uint8 NCHW images, int64 labels) on the device."""
    images = torch.from_numpy(np.ascontiguousarray(host_batch['image'].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(host_batch['label'].astype(np.int64))
    return images.to(self.device), labels.to(self.device)


def _sync(device: torch.device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


class TorchRunner:
  """Runs a `TorchStep` in timed rounds; every step ends with the loop's `.item()` calls."""

  def __init__(self, step: TorchStep, host_batch: dict):
    self.step = step
    self.images, self.labels = step.to_device(host_batch)
    self.synced: list[float] = []
    self.synced_cpu: list[float] = []
    self.result: dict = {}

  def compile(self) -> dict:
    """Runs the first step (torch.compile compiles here); returns its time and losses."""
    s = self.step
    if s.device.type == 'cuda':
      torch.cuda.reset_peak_memory_stats(s.device)
    t0 = time.perf_counter()
    first = s(self.images, self.labels)
    _sync(s.device)
    self.result = {'framework': 'torch.compile' if s.compile_mode else 'torch eager',
                   'compile_mode': s.compile_mode, 'first_call_s': time.perf_counter() - t0,
                   'first_step_metrics': first}
    return self.result

  def warmup(self, n: int):
    """Runs n untimed steps."""
    for _ in range(n):
      self.step(self.images, self.labels)
    _sync(self.step.device)

  def run_synced(self, n: int):
    """Times n steps one by one."""
    for _ in range(n):
      t0, c0 = time.perf_counter(), time.process_time()
      self._last = self.step(self.images, self.labels)
      _sync(self.step.device)
      self.synced.append(time.perf_counter() - t0)
      self.synced_cpu.append(time.process_time() - c0)

  def summary(self) -> dict:
    """Returns the result dict: first-call time, step-time stats, throughput, memory."""
    from reviewkd_jax.bench import jax_step  # pylint: disable=g-import-not-at-top
    s = self.step
    stats = jax_step.summarize(self.synced)
    memory: dict[str, Any] = {}
    if s.device.type == 'cuda':
      memory['device_peak_bytes'] = int(torch.cuda.max_memory_allocated(s.device))
    batch_size = self.images.shape[0]
    return {
        **self.result,
        'step': stats,
        'cpu_step': jax_step.summarize(self.synced_cpu),
        # The authors' loop waits on `.item()` every step, so its throughput is the
        # per-step time; the median is the robust estimate of it.
        'pipelined_step_ms': stats['median_ms'],
        'images_per_s': batch_size / (stats['median_ms'] / 1e3),
        'memory': memory,
        'last_step_metrics': self._last,
        'finite': bool(all(np.isfinite(v) for v in self._last.values())),
        'dtype': s.config.dtype,
        'batch_size': int(batch_size),
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'memory_format': 'NCHW (contiguous)',
    }
