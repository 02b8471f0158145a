"""Cost by part: the pieces of a ReviewKD train step, timed alone in JAX and in PyTorch.

Every part runs on the same shapes in both frameworks (the config's pair and global batch):

- `student_step`: the plain student's train step, no teacher: normalise, forward in train
  mode, CE, backward, SGD (weight decay, momentum, Nesterov as configured) update;
- `teacher_forward`: the frozen teacher's forward in the config's BatchNorm mode (batch
  statistics for the CIFAR configs, as the authors' script leaves the teacher in train mode),
  without gradient;
- `abf_hcl`: the ABF stack on given student features (the review levels, pooled level
  included) and HCL against given teacher features, forward and backward (the gradients of
  the ABFs' parameters and of the student features, which the full step sends on into the
  student), no update;
- `optimizer`: the SGD update alone on the full trainable tree (student + ABFs) from given
  gradients;
- `full_step`: the whole distillation step (`train.step.make_classifier_train_step` / the
  authors' loop body), for comparison with the sum of the parts;
- `conv` (separate, `conv_shapes`): single 3x3 convolutions at resnet20's shapes, forward and
  forward + backward (input and weight gradients), which is where the backbones spend their
  time: it shows how much of a gap is the convolution kernels of the two libraries rather
  than anything this project writes.

JAX parts are jitted with their state donated, as the trainer does; PyTorch parts are eager,
written as the authors' loop runs them. The parts run in rounds, each part's two frameworks
back to back (J, T), so a change of machine load hits both alike.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from reviewkd_jax import losses
from reviewkd_jax import platform
from reviewkd_jax.bench import jax_step as jax_step_lib
from reviewkd_jax.distill import reviewkd
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.train import step as step_lib

PARTS = ('student_step', 'teacher_forward', 'abf_hcl', 'optimizer', 'full_step')

# resnet20 (CIFAR) 3x3 convolutions at batch N: (H = W of the input, C in, C out, stride).
RESNET20_CONVS = ((32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2),
                  (8, 64, 64, 1))


class _GivenFeatures(nn.Module):
  """A stand-in backbone that returns the features it is given (for the ABF stack alone)."""
  kind: str

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return x['pooled'], {self.kind: list(x['levels']), 'pooled': x['pooled']}


def _block(tree):
  return jax.block_until_ready(tree)


class _Timed:
  """One part in one framework: `call()` runs it once and waits for its results."""

  def __init__(self, call: Callable[[], None]):
    self.call = call
    self.times: list[float] = []

  def run(self, n: int):
    for _ in range(n):
      t0 = time.perf_counter()
      self.call()
      self.times.append(time.perf_counter() - t0)


def _jax_parts(step: jax_step_lib.JaxStep, seed: int = 0) -> dict[str, Callable[[], None]]:
  """Returns a zero-argument callable per part for the JAX side (each owns its state)."""
  config, spec, mesh = step.config, step.spec, step.mesh
  rep, sharded = state_lib.replicated(mesh), state_lib.batch_sharded(mesh)
  tx, _ = setup_lib.make_classifier_optimizer(config, step.steps_per_epoch)
  rng = np.random.default_rng(seed)
  # The train step's XLA:CPU options (platform.py), so that the parts add up to the step.
  options = platform.step_compiler_options(mesh.devices.flat)
  params = jax.device_get(step.state.params)
  model_state = jax.device_get(step.state.model_state)
  batch = step.batch
  out = {}

  # student_step: the backbone alone, trained with CE.
  backbone = step.model.student
  s_params = params['student']
  s_stats = model_state['batch_stats']['student']

  def student_step(p, bs, opt, images, labels):
    x = step_lib.normalize(images, spec)

    def loss_fn(p):
      o, new = backbone.apply({'params': p, 'batch_stats': bs}, x, train=True,
                              mutable=['batch_stats'])
      return losses.cross_entropy(o.logits.astype(jnp.float32), labels), new['batch_stats']

    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), new_bs, opt, loss

  f_student = jax.jit(student_step, in_shardings=(rep, rep, rep, sharded, sharded),
                      out_shardings=rep, donate_argnums=(0, 1, 2),
                      compiler_options=options)
  student_state = list(jax.device_put((s_params, s_stats, tx.init(s_params)), rep))

  def run_student():
    p, bs, opt, loss = f_student(*student_state, batch['image'], batch['label'])
    student_state[:] = [p, bs, opt]
    _block(loss)

  out['student_step'] = run_student

  # teacher_forward: as the full step runs it (BN mode of the config), outputs kept alive.
  teacher = step.teacher

  def teacher_forward(tv, images):
    t = step_lib.run_teacher(teacher, tv, step_lib.normalize(images, spec),
                             config.teacher_bn_mode)
    return t.logits, reviewkd.review_features(t.features, config.teacher_features)

  f_teacher = jax.jit(teacher_forward, in_shardings=(rep, sharded), out_shardings=sharded,
                      compiler_options=options)
  out['teacher_forward'] = lambda: _block(f_teacher(step.teacher_variables, batch['image']))

  # abf_hcl: the ABF stack on given student levels, HCL against given teacher levels.
  shape = (1, *spec.image_shape)
  s_channels, s_sizes = reviewkd.feature_spec(backbone, shape, config.student_features)
  t_channels, t_sizes = reviewkd.feature_spec(teacher, shape, config.teacher_features)
  n = config.batch_size
  levels = [rng.standard_normal((n, h, w, c)).astype(np.float32)
            for c, (h, w) in zip(s_channels[:-1], s_sizes[:-1])]
  pooled = rng.standard_normal((n, s_channels[-1])).astype(np.float32)
  targets = [rng.standard_normal((n, h, w, c)).astype(np.float32)
             for c, (h, w) in zip(t_channels, t_sizes)]
  head = step.model.clone(student=_GivenFeatures(config.student_features))
  a_params = {k: v for k, v in params.items() if k != 'student'}
  a_stats = {k: v for k, v in model_state['batch_stats'].items() if k != 'student'}

  def abf_hcl(p, bs, feats, targets):
    def loss_fn(p, feats):
      o, new = head.apply({'params': p, 'batch_stats': bs}, feats, train=True,
                          mutable=['batch_stats'])
      return losses.hcl(o.adapter, targets), new['batch_stats']

    (loss, new_bs), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(p, feats)
    return loss, new_bs, grads

  f_abf = jax.jit(abf_hcl, in_shardings=(rep, rep, sharded, sharded),
                  out_shardings=(rep, rep, (rep, sharded)), donate_argnums=(1,),
                  compiler_options=options)
  abf_args = jax.device_put((a_params, {'levels': levels, 'pooled': pooled}, targets),
                            (rep, sharded, sharded))
  abf_stats = [jax.device_put(a_stats, rep)]

  def run_abf():
    loss, abf_stats[0], grads = f_abf(abf_args[0], abf_stats[0], abf_args[1], abf_args[2])
    _block((loss, grads))

  out['abf_hcl'] = run_abf

  # optimizer: the update of the whole trainable tree from given gradients.
  grads = jax.tree_util.tree_map(
      lambda v: rng.standard_normal(v.shape).astype(v.dtype) * 1e-3, params)

  def update(p, opt, g):
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt

  f_update = jax.jit(update, in_shardings=rep, out_shardings=rep, donate_argnums=(0, 1),
                     compiler_options=options)
  opt_state = list(jax.device_put((params, tx.init(params)), rep))
  g_dev = jax.device_put(grads, rep)

  def run_update():
    opt_state[:] = f_update(opt_state[0], opt_state[1], g_dev)
    _block(opt_state)

  out['optimizer'] = run_update

  runner = jax_step_lib.JaxRunner(step)
  out['full_step'] = lambda: _block(runner._call())  # pylint: disable=protected-access
  return out


def _torch_parts(step: jax_step_lib.JaxStep, torch_step, seed: int = 0
                 ) -> dict[str, Callable[[], None]]:
  """Returns a zero-argument callable per part for the PyTorch side (`torch_step`: a
  `bench.torch_step.TorchStep` of the same config, whose modules the parts reuse)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.testing import torch_reviewkd as authors  # pylint: disable=g-import-not-at-top

  ts, config = torch_step, step.config
  device = ts.device
  images, labels = ts.to_device(step.host_batch)
  out = {}
  backbone = ts.model.student
  params = [p for p in backbone.parameters()]
  opt = torch.optim.SGD(params, lr=1e-3, momentum=config.momentum,
                        nesterov=bool(config.nesterov), weight_decay=config.weight_decay)

  def student_step():
    x = (images.float() / 255.0 - ts.mean) / ts.std
    _, logits = backbone(x)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    loss.item()

  out['student_step'] = student_step

  def teacher_forward():
    x = (images.float() / 255.0 - ts.mean) / ts.std
    with torch.no_grad():
      levels, logits = ts.teacher(x)
    logits[0, 0].item()

  out['teacher_forward'] = teacher_forward

  # abf_hcl: the same ABF modules as the full step, on given features (NCHW).
  class Given(torch.nn.Module):
    def forward(self, x):
      return x

  s_channels = [a.conv1[0].in_channels for a in ts.model.abfs][::-1]
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    x = (images[:1].float() / 255.0 - ts.mean) / ts.std
    s_levels, _ = backbone(x)
    t_levels, _ = ts.teacher(x)
  n = images.shape[0]
  feats = [torch.from_numpy(rng.standard_normal((n, *f.shape[1:])).astype(np.float32))
           .to(device).requires_grad_(True) for f in s_levels]
  targets = [torch.from_numpy(rng.standard_normal((n, *f.shape[1:])).astype(np.float32))
             .to(device) for f in t_levels]
  assert [f.shape[1] for f in feats] == s_channels
  head = authors.ReviewKD(Given(), in_channels=s_channels,
                          out_channels=[f.shape[1] for f in t_levels],
                          shapes=ts.model.shapes, out_shapes=ts.model.out_shapes,
                          mid_channel=ts.model.abfs[0].conv1[0].out_channels).to(device).train()
  head.abfs.load_state_dict(ts.model.abfs.state_dict())

  def abf_hcl():
    for p in [*head.parameters(), *feats]:
      p.grad = None
    results, _ = head((feats, None))
    loss = authors.hcl(results, targets)
    loss.backward()
    loss.item()

  out['abf_hcl'] = abf_hcl

  # optimizer: the full step's optimizer over student + ABFs with given gradients.
  for p in ts.model.parameters():
    p.grad = torch.from_numpy(
        rng.standard_normal(tuple(p.shape)).astype(np.float32) * 1e-3).to(device)

  def update():
    ts.optimizer.step()
    if device.type == 'cuda':
      torch.cuda.synchronize(device)

  out['optimizer'] = update
  runner_images, runner_labels = images, labels
  out['full_step'] = lambda: ts(runner_images, runner_labels)
  return out


def measure_parts(step: jax_step_lib.JaxStep, torch_step, *, parts=PARTS, rounds: int = 3,
                  per_round: int = 3, warmup: int = 1) -> dict:
  """Returns {'parts': {part: {'jax_ms', 'torch_ms', 'torch_over_jax', 'rounds'}}, ...}.

  Medians over `rounds` x `per_round` calls per framework; each round runs every part in
  JAX then in PyTorch. The full step's state is advanced by these calls (run it after the
  main benchmark, never before).
  """
  jp = _jax_parts(step)
  tp = _torch_parts(step, torch_step) if torch_step is not None else {}
  timed = {(part, fw): _Timed(calls[part]) for part in parts
           for fw, calls in (('jax', jp), ('torch', tp)) if part in calls}
  for t in timed.values():  # compiles the JAX parts; warms PyTorch's allocator
    t.call()
    for _ in range(warmup):
      t.call()
  round_loads = []
  for _ in range(rounds):
    round_loads.append(os.getloadavg()[0])
    for part in parts:
      for fw in ('jax', 'torch'):
        if (part, fw) in timed:
          timed[(part, fw)].run(per_round)
  result = {}
  for part in parts:
    row = {}
    for fw in ('jax', 'torch'):
      if (part, fw) in timed:
        times = np.asarray(timed[(part, fw)].times) * 1e3
        row[f'{fw}_ms'] = float(np.median(times))
        row[f'{fw}_all_ms'] = [round(float(v), 2) for v in times]
    if 'jax_ms' in row and 'torch_ms' in row:
      row['torch_over_jax'] = row['torch_ms'] / row['jax_ms']
      j = np.asarray(row['jax_all_ms']).reshape(rounds, per_round)
      t = np.asarray(row['torch_all_ms']).reshape(rounds, per_round)
      row['torch_over_jax_per_round'] = [float(v) for v in
                                         np.median(t, 1) / np.median(j, 1)]
    result[part] = row
  return {'parts': result, 'rounds': rounds, 'per_round': per_round,
          'load_average_per_round': round_loads}


def measure_convs(batch: int, shapes=RESNET20_CONVS, *, rounds: int = 3, per_round: int = 5,
                  device: str = 'cpu', seed: int = 0) -> list[dict]:
  """Times single 3x3 convolutions (padding 1, no bias) in JAX (NHWC, jitted) and PyTorch
  (NCHW), forward alone and forward + backward (input and weight gradients), interleaved
  by round; returns one row per shape."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  rows = []
  for size, cin, cout, stride in shapes:
    out_size = (size + 2 - 3) // stride + 1
    x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g = rng.standard_normal((batch, out_size, out_size, cout)).astype(np.float32)

    def conv(x, w, stride=stride):
      return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def fwd_bwd(x, w, g):
      y, vjp = jax.vjp(conv, x, w)
      return (y, *vjp(g))

    # XLA:CPU's default convolutions (YNNPACK), and its Eigen ones (platform.EIGEN_CONVS).
    options = platform.EIGEN_CONVS if jax.devices()[0].platform == 'cpu' else None
    fwd, fwd_opt = jax.jit(conv), jax.jit(conv, compiler_options=options)
    fb, fb_opt = jax.jit(fwd_bwd), jax.jit(fwd_bwd, compiler_options=options)
    xj, wj, gj = (jnp.asarray(a) for a in (x, w, g))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).to(device)
    gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2))).to(device)
    xt.requires_grad_(True)
    wt.requires_grad_(True)

    def t_fwd():
      with torch.no_grad():
        y = F.conv2d(xt, wt, stride=stride, padding=1)
      y[0, 0, 0, 0].item()

    def t_fb():
      y = F.conv2d(xt, wt, stride=stride, padding=1)
      dx, dw = torch.autograd.grad(y, (xt, wt), gt)
      dx[0, 0, 0, 0].item()
      dw[0, 0, 0, 0].item()

    # Same numbers in both (a check that the two compute the same convolution).
    y_t = F.conv2d(xt, wt, stride=stride, padding=1)
    dx_t, dw_t = torch.autograd.grad(y_t, (xt, wt), gt)
    expected = (y_t.detach().cpu().numpy().transpose(0, 2, 3, 1),
                dx_t.cpu().numpy().transpose(0, 2, 3, 1),
                dw_t.cpu().numpy().transpose(2, 3, 1, 0))
    err = max(float(np.abs(np.asarray(a) - b).max() / (np.abs(b).max() + 1e-12))
              for f in (fb, fb_opt) for a, b in zip(f(xj, wj, gj), expected))
    timed = {('fwd', 'jax'): _Timed(lambda: _block(fwd(xj, wj))),
             ('fwd', 'jax_eigen'): _Timed(lambda: _block(fwd_opt(xj, wj))),
             ('fwd', 'torch'): _Timed(t_fwd),
             ('fwd_bwd', 'jax'): _Timed(lambda: _block(fb(xj, wj, gj))),
             ('fwd_bwd', 'jax_eigen'): _Timed(lambda: _block(fb_opt(xj, wj, gj))),
             ('fwd_bwd', 'torch'): _Timed(t_fb)}
    for t in timed.values():
      t.call()
    for _ in range(rounds):
      for t in timed.values():
        t.run(per_round)
    row = {'batch': batch, 'size': size, 'in_channels': cin, 'out_channels': cout,
           'stride': stride, 'max_rel_diff': err,
           'flops_fwd': 2.0 * batch * out_size * out_size * cout * 9 * cin}
    for (kind, fw), t in timed.items():
      row[f'{kind}_{fw}_ms'] = float(np.median(t.times) * 1e3)
    for kind in ('fwd', 'fwd_bwd'):
      row[f'{kind}_torch_over_jax'] = row[f'{kind}_torch_ms'] / row[f'{kind}_jax_ms']
      row[f'{kind}_torch_over_jax_eigen'] = row[f'{kind}_torch_ms'] / row[f'{kind}_jax_eigen_ms']
    rows.append(row)
  return rows


def format_parts(parts: dict, convs: list[dict] | None) -> str:
  """Returns the cost-by-part table and the convolution table as text."""
  lines = []
  if parts:
    lines += ['', f"{'part':<18}{'JAX ms':>10}{'PyTorch ms':>12}{'PyTorch/JAX':>13}"
              '   per round']
    for part, row in parts['parts'].items():
      ratio = row.get('torch_over_jax')
      per_round = ', '.join(f'{v:.2f}' for v in row.get('torch_over_jax_per_round', []))
      lines.append(f"{part:<18}{row.get('jax_ms', float('nan')):>10.1f}"
                   f"{row.get('torch_ms', float('nan')):>12.1f}"
                   f"{'' if ratio is None else format(ratio, '.2f') + 'x':>13}   {per_round}")
    loads = ', '.join(f'{v:.1f}' for v in parts['load_average_per_round'])
    lines.append(f'(PyTorch/JAX > 1: JAX is faster; medians of {parts["rounds"]} rounds x '
                 f'{parts["per_round"]} calls; load per round {loads})')
  if convs:
    lines += ['', f"{'conv 3x3, ms per call':<24}{'fwd XLA':>9}{'Eigen':>7}{'PT':>7}"
              f"{'f+b XLA':>10}{'Eigen':>7}{'PT':>7}{'PT/XLA':>8}{'PT/Eigen':>9}"]
    for r in convs:
      name = (f"{r['batch']}x{r['size']}x{r['size']} {r['in_channels']}->{r['out_channels']}"
              f"{' s2' if r['stride'] == 2 else ''}")
      lines.append(f"{name:<24}{r['fwd_jax_ms']:>9.1f}{r['fwd_jax_eigen_ms']:>7.1f}"
                   f"{r['fwd_torch_ms']:>7.1f}{r['fwd_bwd_jax_ms']:>10.1f}"
                   f"{r['fwd_bwd_jax_eigen_ms']:>7.1f}{r['fwd_bwd_torch_ms']:>7.1f}"
                   f"{r['fwd_bwd_torch_over_jax']:>7.2f}x"
                   f"{r['fwd_bwd_torch_over_jax_eigen']:>8.2f}x")
    lines.append("(medians; XLA = XLA:CPU's default convolutions (YNNPACK, what the step "
                 'uses), Eigen = its Eigen ones (platform.EIGEN_CONVS, not enabled), PT = '
                 'PyTorch; f+b = forward + input and weight gradients)')
  return '\n'.join(lines)
