"""PyTorch-side helpers for parity tests: torchvision import on CPU torch, random BN stats,
and one comparison routine that every model family's parity test uses."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from reviewkd_jax.testing import torchvision  # noqa: E402,F401  (re-export)


def randomize(module, seed: int = 0, calibrate=None):
  """Gives every parameter random values and every BatchNorm random running statistics.

  With `calibrate` (an NCHW batch), the running statistics are first set to that batch's
  statistics (as training would leave them) and then perturbed at random (mean shifted by
  +-0.2 std, variance scaled by 0.6..1.6). Without it, the statistics are drawn blind and
  normalise nothing, so activations of deep residual nets grow to ~1e4, where float32
  rounding alone exceeds any useful absolute tolerance.
  """
  gen = torch.Generator().manual_seed(seed)
  bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
    for m in bns:
      m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
      m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
      m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    if calibrate is not None:
      was_training, momenta = module.training, [m.momentum for m in bns]
      for m in bns:
        m.momentum = 1.0  # running stats := this batch's stats
      module.train()
      module(calibrate)
      module.train(was_training)
      for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        std = m.running_var.sqrt()
        m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.2 * std)
        m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) + 0.6)
  return module


def nchw_to_nhwc(t) -> np.ndarray:
  """Returns a torch NCHW (or NC) tensor as a numpy NHWC (or NC) array."""
  a = t.detach().cpu().numpy()
  return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def max_abs_diff(a, b) -> float:
  """Returns max |a - b| after checking shapes match."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, f'shape mismatch {a.shape} vs {b.shape}'
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def _named_pairs(flax_out, torch_logits, torch_features):
  logits, feats = flax_out
  yield 'logits', logits, torch_logits
  for key, tv in torch_features.items():
    fv = feats[key]
    if isinstance(tv, (list, tuple)):
      assert len(fv) == len(tv), f'{key}: {len(fv)} flax entries vs {len(tv)} torch entries'
      yield from ((f'{key}[{i}]', a, b) for i, (a, b) in enumerate(zip(fv, tv)))
    else:
      yield key, fv, tv


def assert_as_accurate(name, ours, torch32, torch64=None, atol: float = 1e-4) -> float:
  """Asserts `ours` is within `atol` of PyTorch f32, or at least as accurate as it vs f64.

  Returns |ours - torch f32|. See `compare_features` for the criterion.
  """
  d = max_abs_diff(ours, nchw_to_nhwc(torch32))
  if d <= atol:
    return d
  assert torch64 is not None, f'{name} differs by {d}'
  truth = nchw_to_nhwc(torch64)
  ours_err = max_abs_diff(ours, truth)
  torch_err = max_abs_diff(nchw_to_nhwc(torch32), truth)
  assert ours_err <= 2 * torch_err + atol / 10, (
      f'{name} differs by {d}: error vs float64 {ours_err:.2e}, PyTorch f32 {torch_err:.2e}')
  return d


def compare_features(flax_out, torch_logits, torch_features: dict, atol: float = 1e-4,
                     exact=None) -> float:
  """Asserts logits and every feature agree; returns the worst |flax - torch f32| difference.

  Each tensor must be within `atol` of PyTorch's float32 result. Where it is not and `exact`
  (PyTorch's float64 `(logits, features)` of the same model) is given, it must instead be at
  least as accurate as PyTorch itself: |flax - torch f64| <= 2 |torch f32 - torch f64| + atol/10.
  Deep random nets amplify float32 rounding (summation order) beyond any fixed atol; this
  criterion still fails on any real difference in the computation.
  """
  exact_pairs = dict(((n, b) for n, _, b in _named_pairs(flax_out, *exact))) if exact else {}
  worst = 0.0
  for name, ours, theirs in _named_pairs(flax_out, torch_logits, torch_features):
    worst = max(worst, assert_as_accurate(name, ours, theirs, exact_pairs.get(name), atol))
  return worst


def run_parity(flax_model, torch_model, torch_forward, *, input_shape, seed=0, atol=1e-4,
               randomize_fn=None):
  """Converts a randomised PyTorch model into `flax_model` and compares outputs in eval mode.

  `torch_forward(torch_model, x_nchw)` returns `(logits, features_dict)` in the Flax features
  layout (NCHW tensors). `input_shape` is NHWC. `randomize_fn(model, seed)` replaces
  the default (`randomize` calibrated on the input). Returns the worst abs
  difference.
  """
  from reviewkd_jax import convert  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(input_shape).astype(np.float32)
  x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
  if randomize_fn is None:
    # Statistics from a separate batch of 8: with 1-2 images, 2x2 late-stage maps give
    # near-zero variances that blow activations up.
    calib = rng.standard_normal((8, *input_shape[1:])).astype(np.float32)
    randomize(torch_model, seed, calibrate=torch.from_numpy(calib.transpose(0, 3, 1, 2)))
  else:
    randomize_fn(torch_model, seed)
  torch_model.eval()
  template = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.asarray(x),
                                                    train=False))
  variables = convert.torch_to_flax(torch_model.state_dict(), template)
  with torch.no_grad():
    t_logits, t_feats = torch_forward(torch_model, x_nchw)
    exact = torch_forward(copy.deepcopy(torch_model).double(), x_nchw.double())
  out = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, jnp.asarray(x))
  return compare_features(out, t_logits, t_feats, atol=atol, exact=exact)


def param_count(flax_model, input_shape=(1, 32, 32, 3)) -> int:
  """Returns the number of trainable parameters of a Flax model (shape inference only)."""
  shapes = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.zeros(input_shape),
                                                  train=False))
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes['params']))
