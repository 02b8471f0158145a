"""PyTorch-side helpers for parity tests: torchvision import on CPU torch, random BN stats,
and one comparison routine that every model family's parity test uses."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')


@functools.cache
def torchvision():
  """Returns the torchvision module, importable on CPU torch (its CUDA-only ops declared)."""
  try:
    lib = torch.library.Library('torchvision', 'DEF')
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')
    torchvision._lib = lib  # keep the library object alive
  except RuntimeError:
    pass  # already declared in this process
  import torchvision as tv  # pylint: disable=g-import-not-at-top
  return tv


def randomize(module, seed: int = 0):
  """Gives every parameter random values and every BatchNorm random running statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
    for m in module.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
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


def compare_features(flax_out, torch_logits, torch_features: dict, atol: float = 1e-4) -> float:
  """Asserts logits and every feature list entry agree; returns the worst abs difference.

  `torch_features` holds the same keys as the Flax features dict, as NCHW/NC torch tensors.
  """
  logits, feats = flax_out
  worst = max_abs_diff(logits, torch_logits.detach().numpy())
  assert worst <= atol, f'logits differ by {worst}'
  for key, tv in torch_features.items():
    fv = feats[key]
    if isinstance(tv, (list, tuple)):
      assert len(fv) == len(tv), f'{key}: {len(fv)} flax entries vs {len(tv)} torch entries'
      pairs = [(f'{key}[{i}]', a, b) for i, (a, b) in enumerate(zip(fv, tv))]
    else:
      pairs = [(key, fv, tv)]
    for name, a, b in pairs:
      d = max_abs_diff(a, nchw_to_nhwc(b))
      assert d <= atol, f'{name} differs by {d}'
      worst = max(worst, d)
  return worst


def run_parity(flax_model, torch_model, torch_forward, *, input_shape, seed=0, atol=1e-4,
               randomize_fn=None):
  """Converts a randomised PyTorch model into `flax_model` and compares outputs in eval mode.

  `torch_forward(torch_model, x_nchw)` returns `(logits, features_dict)` in the Flax features
  layout (NCHW tensors). `input_shape` is NHWC. `randomize_fn(model, seed)` replaces
  `randomize` (e.g. damped residual branches for very deep nets). Returns the worst abs
  difference.
  """
  from reviewkd_jax import convert  # pylint: disable=g-import-not-at-top
  (randomize_fn or randomize)(torch_model, seed).eval()
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(input_shape).astype(np.float32)
  template = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.asarray(x),
                                                    train=False))
  variables = convert.torch_to_flax(torch_model.state_dict(), template)
  with torch.no_grad():
    t_logits, t_feats = torch_forward(torch_model, torch.from_numpy(x.transpose(0, 3, 1, 2)))
  out = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, jnp.asarray(x))
  return compare_features(out, t_logits, t_feats, atol=atol)


def param_count(flax_model, input_shape=(1, 32, 32, 3)) -> int:
  """Returns the number of trainable parameters of a Flax model (shape inference only)."""
  shapes = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.zeros(input_shape),
                                                  train=False))
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes['params']))
