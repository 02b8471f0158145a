"""HCL, cross-entropy and KD against independent computations (PyTorch and numpy)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import losses

torch = pytest.importorskip('torch')
F = torch.nn.functional
from reviewkd_jax.testing import torch_reviewkd as torch_ref  # noqa: E402


def numpy_adaptive_pool(x, l):
  """Loop form of adaptive average pooling (NHWC), straight from the bin definition."""
  n, h, w, c = x.shape
  out = np.zeros((n, l, l, c), np.float64)
  for i in range(l):
    h0, h1 = math.floor(i * h / l), math.ceil((i + 1) * h / l)
    for j in range(l):
      w0, w1 = math.floor(j * w / l), math.ceil((j + 1) * w / l)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize('size', [1, 2, 3, 4, 5, 7, 8, 14, 16, 28, 32, 56])
@pytest.mark.parametrize('bins', [1, 2, 4])
def test_adaptive_pool_matches_torch_and_loop(size, bins):
  x = np.random.default_rng(size * 10 + bins).standard_normal((2, size, size, 3)).astype(
      np.float32)
  ours = np.asarray(losses.adaptive_avg_pool(jnp.asarray(x), bins))
  ref = F.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), bins).numpy()
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-6)
  np.testing.assert_allclose(ours, numpy_adaptive_pool(x, bins), atol=1e-6)


def test_seven_by_seven_four_bins_overlap():
  # PyTorch's bins for 7 -> 4 are [0,2), [1,4), [3,6), [5,7): uneven and overlapping.
  m = losses.review.adaptive_pool_matrix(7, 4)
  spans = [tuple(np.nonzero(row)[0][[0, -1]]) for row in m]
  assert spans == [(0, 1), (1, 3), (3, 5), (5, 6)]
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)


def _levels(shapes, seed):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize('shapes', [
    # ImageNet ResNet18 <- ResNet34 levels (56, 28, 14, 7, pooled), channels cut for speed.
    [(2, 56, 56, 4), (2, 28, 28, 4), (2, 14, 14, 8), (2, 7, 7, 8), (2, 1, 1, 16)],
    # CIFAR levels, plus odd sizes where bins overlap.
    [(3, 32, 32, 2), (3, 16, 16, 3), (3, 8, 8, 4), (3, 1, 1, 5)],
    [(2, 5, 5, 3), (2, 3, 3, 3), (2, 2, 2, 3)],
])
def test_hcl_matches_authors_torch_code(shapes):
  fs, ft = _levels(shapes, 0), _levels(shapes, 1)
  ours = float(jax.jit(losses.hcl)([jnp.asarray(a) for a in fs], [jnp.asarray(a) for a in ft]))
  ref = float(torch_ref.hcl([torch.from_numpy(a.transpose(0, 3, 1, 2)) for a in fs],
                        [torch.from_numpy(a.transpose(0, 3, 1, 2)) for a in ft]))
  assert ours == pytest.approx(ref, rel=1e-5)


def test_hcl_hand_computed_single_level():
  # One 2x2 map, one channel: levels 4 and 2 are skipped (l >= h), level 1 has weight 1/2.
  fs = np.array([[[[1.], [2.]], [[3.], [4.]]]], np.float32)
  ft = np.zeros_like(fs)
  mse = (1 + 4 + 9 + 16) / 4
  pooled = 2.5**2
  expected = (mse + 0.5 * pooled) / 1.5
  assert float(losses.hcl([fs], [ft])) == pytest.approx(expected, rel=1e-6)
  # Sum, not mean, over levels.
  assert float(losses.hcl([fs, fs], [ft, ft])) == pytest.approx(2 * expected, rel=1e-6)


def test_hcl_is_zero_iff_equal_and_rejects_mismatch():
  a = _levels([(2, 8, 8, 3)], 3)
  assert float(losses.hcl(a, a)) == 0.0
  with pytest.raises(ValueError, match='equal shapes'):
    losses.hcl(a, _levels([(2, 4, 4, 3)], 3))
  with pytest.raises(ValueError, match='levels'):
    losses.hcl(a, a + a)


def test_hcl_bf16_inputs_computed_in_f32():
  fs, ft = _levels([(2, 7, 7, 4)], 4), _levels([(2, 7, 7, 4)], 5)
  full = float(losses.hcl(fs, ft))
  half = losses.hcl([jnp.asarray(fs[0], jnp.bfloat16)], [jnp.asarray(ft[0], jnp.bfloat16)])
  assert half.dtype == jnp.float32
  assert float(half) == pytest.approx(full, rel=2e-2)


def test_cross_entropy_matches_torch_and_masks():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 6)
  ref = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
  assert float(losses.cross_entropy(logits, labels)) == pytest.approx(ref, rel=1e-6)
  w = np.array([1, 1, 1, 0, 0, 0], np.float32)
  ref3 = F.cross_entropy(torch.from_numpy(logits[:3]), torch.from_numpy(labels[:3])).item()
  assert float(losses.cross_entropy(logits, labels, weights=w)) == pytest.approx(ref3, rel=1e-6)


def test_kd_loss_matches_authors_formula_and_stops_teacher_gradient():
  rng = np.random.default_rng(1)
  s = rng.standard_normal((5, 7)).astype(np.float32)
  t = rng.standard_normal((5, 7)).astype(np.float32)
  T = 4.0
  ref = (F.kl_div(F.log_softmax(torch.from_numpy(s) / T, 1), F.softmax(torch.from_numpy(t) / T, 1),
                  reduction='batchmean') * T * T).item()
  assert float(losses.kd_loss(s, t, temperature=T)) == pytest.approx(ref, rel=1e-5)
  # The default temperature is the authors' DistillKL(4).
  assert float(losses.kd_loss(s, t)) == pytest.approx(ref, rel=1e-5)
  assert float(losses.kd_loss(s, s)) == pytest.approx(0.0, abs=1e-7)
  g_t = jax.grad(lambda t: losses.kd_loss(s, t))(jnp.asarray(t))
  g_s = jax.grad(lambda s: losses.kd_loss(s, t))(jnp.asarray(s))
  assert float(jnp.abs(g_t).max()) == 0.0
  assert float(jnp.abs(g_s).max()) > 0.0


def test_importing_losses_does_not_import_tensorflow():
  import subprocess
  import sys
  code = ('import sys, reviewkd_jax.losses; '
          'bad = [m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True)
