"""The comparison methods' losses against independent numpy formulations and hand-worked
numbers, their invariances, and gradients that reach only the student side."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax.losses import methods as L

RNG = np.random.default_rng(0)


def _rand(*shape, scale=1.0):
  return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _pool_np(x: np.ndarray, size: int) -> np.ndarray:
  """Average pooling of NHWC `x` by an integer factor (sizes divide evenly)."""
  n, h, w, c = x.shape
  f = h // size
  return x.reshape(n, size, f, size, f, c).mean(axis=(2, 4))


def _j(fn, *args, **kwargs):
  """Calls `fn` compiled (kwargs static): one XLA program instead of many eager ops."""
  return jax.jit(functools.partial(fn, **kwargs))(*args)


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
  got = float(got)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
  return abs(got - want)


# ------------------------------------------------------------------------------- FitNet


def test_fitnet_matches_numpy_mse_times_beta():
  s, t = _rand(4, 8, 8, 6), _rand(4, 8, 8, 6)
  want = 100.0 * np.mean((s.astype(np.float64) - t) ** 2)
  _assert_close(_j(L.fitnet_loss, s, t), want)
  _assert_close(_j(L.fitnet_loss, s, t, weight=1.0), want / 100.0)
  with pytest.raises(ValueError):
    _j(L.fitnet_loss, s, t[:, :4])


# ------------------------------------------------------------------------------- AT


def _np_at_map(f, p=2):
  a = (f.astype(np.float64) ** p).mean(axis=-1).reshape(f.shape[0], -1)
  return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def test_at_matches_numpy_with_pooling_and_sums_layers():
  s = [_rand(3, 8, 8, 4), _rand(3, 4, 4, 6)]
  t = [_rand(3, 4, 4, 5), _rand(3, 8, 8, 7)]   # pair 0 pools the student, pair 1 the teacher
  pairs = [(_pool_np(s[0], 4), t[0]), (s[1], _pool_np(t[1], 4))]
  want = 1000.0 * sum(np.mean((_np_at_map(a) - _np_at_map(b)) ** 2) for a, b in pairs)
  _assert_close(_j(L.at_loss, s, t), want)


def test_at_hand_worked():
  # One 1x2 map, one channel: student values (1, 0) -> attention (1, 0); teacher (1, 1) ->
  # (1, 1)/sqrt(2). mean of squared differences = ((1 - 1/sqrt2)^2 + (1/sqrt2)^2) / 2.
  s = np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)
  t = np.array([1.0, 1.0], np.float32).reshape(1, 1, 2, 1)
  r = 1 / math.sqrt(2)
  _assert_close(_j(L.at_loss, [s], [t], weight=1.0), ((1 - r) ** 2 + r ** 2) / 2)


def test_at_is_invariant_to_feature_scale():
  s, t = _rand(2, 4, 4, 3), _rand(2, 4, 4, 3)
  base = float(_j(L.at_loss, [s], [t]))
  assert base > 1.0
  _assert_close(_j(L.at_loss, [7.0 * s], [t]), base, rtol=1e-5)
  _assert_close(_j(L.at_loss, [s], [0.01 * t]), base, rtol=1e-5)


# ------------------------------------------------------------------------------- PKT


def _np_pkt(s, t, eps=1e-7):
  def probs(x):
    x = x.astype(np.float64)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    sim = (x @ x.T + 1) / 2
    return sim / sim.sum(axis=1, keepdims=True)
  ps, pt = probs(s), probs(t)
  return 30000.0 * np.mean(pt * np.log((pt + eps) / (ps + eps)))


def test_pkt_matches_numpy():
  s, t = _rand(16, 10), _rand(16, 12)
  _assert_close(_j(L.pkt_loss, s, t), _np_pkt(s, t), rtol=2e-4)
  # Maps are flattened per example.
  s4, t4 = _rand(8, 2, 2, 3), _rand(8, 3, 3, 2)
  _assert_close(_j(L.pkt_loss, s4, t4), _np_pkt(s4.reshape(8, -1), t4.reshape(8, -1)),
                rtol=2e-4)


def test_pkt_is_invariant_to_feature_scale_and_zero_on_identical_inputs():
  s, t = _rand(16, 10), _rand(16, 10)
  base = float(_j(L.pkt_loss, s, t))
  assert base > 10.0
  _assert_close(_j(L.pkt_loss, 50.0 * s, t), base, rtol=1e-4)
  _assert_close(_j(L.pkt_loss, s, 0.02 * t), base, rtol=1e-4)
  assert abs(float(_j(L.pkt_loss, s, 3.0 * s))) < 1e-2


# ------------------------------------------------------------------------------- RKD


def _np_rkd_terms(s, t):
  def dist(e):
    n = len(e)
    d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
    return d / d[~np.eye(n, dtype=bool)].mean()

  def angles(e):
    n = len(e)
    out = np.zeros((n, n, n))
    for i in range(n):
      for j in range(n):
        for k in range(n):
          u, v = e[j] - e[i], e[k] - e[i]
          nu, nv = np.linalg.norm(u), np.linalg.norm(v)
          out[i, j, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
    return out

  def smooth_l1(a, b):
    d = np.abs(a - b)
    return np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))

  s, t = s.astype(np.float64), t.astype(np.float64)
  return smooth_l1(dist(s), dist(t)), smooth_l1(angles(s), angles(t))


def test_rkd_matches_numpy_loops():
  s, t = _rand(7, 5), _rand(7, 9, scale=3.0)
  d, a = _np_rkd_terms(s, t)
  _assert_close(_j(L.rkd_loss, s, t), 25.0 * d + 50.0 * a, rtol=1e-4)
  _assert_close(_j(L.rkd_loss, s, t, distance_weight=1.0, angle_weight=0.0), d, rtol=1e-4)
  _assert_close(_j(L.rkd_loss, s, t, distance_weight=0.0, angle_weight=1.0), a, rtol=1e-4)


def test_rkd_hand_worked_distance_term():
  # Student: the corners (0,0), (1,0), (0,1). Distances 1, 1, sqrt2; mean over the 6
  # off-diagonal entries = (2 + sqrt2) / 3. Teacher: an equilateral triangle -> all ones.
  s = np.array([[0, 0], [1, 0], [0, 1]], np.float32)
  t = np.array([[0, 0], [1, 0], [0.5, math.sqrt(3) / 2]], np.float32)
  mean = (2 + math.sqrt(2)) / 3
  diffs = [1 / mean - 1] * 4 + [math.sqrt(2) / mean - 1] * 2   # off-diagonal entries
  want = sum(0.5 * d * d for d in diffs) / 9                     # mean over all 9 entries
  _assert_close(_j(L.rkd_loss, s, t, distance_weight=1.0, angle_weight=0.0), want, rtol=1e-5)


@pytest.mark.parametrize('term', ['distance', 'angle'])
def test_rkd_terms_are_scale_invariant(term):
  w = dict(distance_weight=1.0, angle_weight=0.0) if term == 'distance' else dict(
      distance_weight=0.0, angle_weight=1.0)
  s, t = _rand(8, 6), _rand(8, 6)
  base = float(_j(L.rkd_loss, s, t, **w))
  assert base > 1e-2
  _assert_close(_j(L.rkd_loss, 10.0 * s, t, **w), base, rtol=1e-4)
  _assert_close(_j(L.rkd_loss, s, 0.1 * t, **w), base, rtol=1e-4)


def test_rkd_student_gradient_is_finite():
  s, t = _rand(6, 4), _rand(6, 4)
  g = jax.jit(jax.grad(lambda x: L.rkd_loss(x, t)))(s)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# ------------------------------------------------------------------------------- CRD NCE


def _np_nce(x, n, eps=1e-7):
  x = x.astype(np.float64)
  k = x.shape[1] - 1
  log_d1 = np.log(x[:, 0] / (x[:, 0] + k / n + eps))
  log_d0 = np.log((k / n) / (x[:, 1:] + k / n + eps))
  return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def test_nce_hand_worked_and_numpy():
  # B=1, K=1, n=2: K/n = 0.5; scores (0.5, 0.5) -> -(log(1/2) + log(1/2)) = 2 log 2.
  x = np.array([[0.5, 0.5]], np.float32)
  _assert_close(_j(L.nce_loss, x, num_data=2), 2 * math.log(2), rtol=1e-6)
  s = RNG.uniform(1e-5, 1e-3, (5, 33)).astype(np.float32)
  t = RNG.uniform(1e-5, 1e-3, (5, 33)).astype(np.float32)
  _assert_close(_j(L.crd_loss, s, t, num_data=1000),
                0.8 * (_np_nce(s, 1000) + _np_nce(t, 1000)), rtol=1e-5)


# ------------------------------------------------------------------------------- VID


def test_vid_loss_matches_numpy_and_pools_teacher():
  mu = [_rand(2, 4, 4, 3), _rand(2, 2, 2, 5)]
  var = [RNG.uniform(0.5, 3, 3).astype(np.float32), RNG.uniform(0.5, 3, 5).astype(np.float32)]
  t = [_rand(2, 4, 4, 3), _rand(2, 4, 4, 5)]
  targets = [t[0], _pool_np(t[1], 2)]
  want = sum(np.mean(0.5 * ((m.astype(np.float64) - tt) ** 2 / v + np.log(v)))
             for m, v, tt in zip(mu, var, targets))
  _assert_close(_j(L.vid_loss, mu, var, t), want)
  _assert_close(_j(L.vid_loss, mu, var, t, weight=2.0), 2 * want)


# ------------------------------------------------------------------------------- OFD


def _np_ofd_layer(s, t, m):
  """mdistiller's three-case formulation of the partial L2 (summed)."""
  s, t = s.astype(np.float64), t.astype(np.float64)
  m = np.broadcast_to(m, s.shape)
  loss = ((s - m) ** 2 * ((s > m) & (t <= m))
          + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
          + (s - t) ** 2 * (t > 0))
  return loss.sum()


def test_ofd_loss_matches_case_analysis():
  n = 3
  s = [_rand(n, 8, 8, 4), _rand(n, 4, 4, 6)]
  t = [_rand(n, 8, 8, 4), _rand(n, 4, 4, 6)]
  m = [-RNG.uniform(0.1, 1.5, 4).astype(np.float32),
       -RNG.uniform(0.1, 1.5, 6).astype(np.float32)]
  want = 1e-3 * (_np_ofd_layer(s[0], t[0], m[0]) / 2 + _np_ofd_layer(s[1], t[1], m[1])) / n
  _assert_close(_j(L.ofd_loss, s, t, m), want, rtol=1e-5)


def test_ofd_partial_l2_hand_worked():
  margin = np.array([-1.0], np.float32)
  # (s, t) -> contribution: t>0: (s-t)^2; m<t<=0: only if s>t; t<=m: (s-m)^2 only if s>m.
  cases = [((2.0, 1.0), 1.0), ((0.0, 1.0), 1.0), ((-0.2, -0.5), 0.09), ((-0.7, -0.5), 0.0),
           ((0.5, -3.0), 2.25), ((-2.0, -3.0), 0.0),
           ((0.5, 0.0), 0.25), ((-0.5, 0.0), 0.0)]
  s = np.array([c[0][0] for c in cases], np.float32).reshape(1, 1, -1, 1)
  t = np.array([c[0][1] for c in cases], np.float32).reshape(1, 1, -1, 1)
  _assert_close(_j(L.ofd_partial_l2, s, t, margin), sum(c[1] for c in cases), rtol=1e-6)


# ------------------------------------------------------------------------------- DKD


def _np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _np_dkd(s, t, y, alpha, beta, temp):
  s, t = s.astype(np.float64), t.astype(np.float64)
  b = len(y)
  ps, pt = _np_softmax(s / temp), _np_softmax(t / temp)
  rows = np.arange(b)
  bs = np.stack([ps[rows, y], 1 - ps[rows, y]], 1)
  bt = np.stack([pt[rows, y], 1 - pt[rows, y]], 1)
  tckd = np.sum(bt * np.log(bt / bs)) / b * temp ** 2
  # Non-target distributions: drop the target column, renormalise.
  keep = np.ones_like(s, bool)
  keep[rows, y] = False
  qs = _np_softmax(s[keep].reshape(b, -1) / temp)
  qt = _np_softmax(t[keep].reshape(b, -1) / temp)
  nckd = np.sum(qt * np.log(qt / qs)) / b * temp ** 2
  return alpha * tckd + beta * nckd


def test_dkd_matches_numpy_with_gt_mask_and_warmup():
  s, t = _rand(6, 10, scale=3.0), _rand(6, 10, scale=3.0)
  y = RNG.integers(0, 10, 6)
  want = _np_dkd(s, t, y, 1.0, 8.0, 4.0)
  _assert_close(_j(L.dkd_loss, s, t, y), want, rtol=1e-5)
  _assert_close(_j(L.dkd_loss, s, t, y, alpha=0.5, beta=2.0, temperature=2.0),
                _np_dkd(s, t, y, 0.5, 2.0, 2.0), rtol=1e-5)
  _assert_close(_j(L.dkd_loss, s, t, y, epoch=5), want * 5 / 20, rtol=1e-5)
  _assert_close(_j(L.dkd_loss, s, t, y, epoch=40), want, rtol=1e-5)
  # NCKD ignores the target logit: moving it changes only TCKD.
  s2 = s.copy()
  s2[np.arange(6), y] += 5.0
  nckd = lambda x: float(_j(L.dkd_loss, x, t, y, alpha=0.0, beta=1.0))
  _assert_close(nckd(s2), nckd(s), rtol=1e-4)


def test_dkd_hand_worked_two_classes():
  # Two classes: no non-target spread (NCKD = 0); TCKD = KL of the two softmaxes * T^2.
  s = np.array([[0.0, 0.0]], np.float32)
  t = np.array([[4.0, 0.0]], np.float32)   # T=4: teacher p = sigmoid(1)
  p = 1 / (1 + math.exp(-1))
  want = (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)) * 16
  _assert_close(_j(L.dkd_loss, s, t, np.array([0])), want, rtol=1e-5)


# ------------------------------------------------------------------------------- shared


def _cases():
  s4, t4 = _rand(4, 4, 4, 3), _rand(4, 4, 4, 3)
  s2, t2 = _rand(6, 5), _rand(6, 7)
  margin = -np.abs(_rand(3))
  y = np.array([0, 2, 1, 3])
  return {
      'fitnet': (L.fitnet_loss, s4, t4, {}),
      'at': (lambda s, t: L.at_loss([s], [t]), s4, t4, {}),
      'pkt': (L.pkt_loss, s2, t2, {}),
      'rkd': (L.rkd_loss, s2, t2, {}),
      'vid': (lambda s, t: L.vid_loss([s], [jnp.full((3,), 2.0)], [t]), s4, t4, {}),
      'ofd': (lambda s, t: L.ofd_loss([s], [t], [margin]), s4, t4, {}),
      'dkd': (lambda s, t: L.dkd_loss(s, t, y), _rand(4, 5), _rand(4, 5), {}),
  }


@pytest.mark.parametrize('name', sorted(_cases()))
def test_gradient_reaches_only_the_student(name):
  fn, s, t, _ = _cases()[name]
  gs, gt = jax.jit(jax.grad(fn, argnums=(0, 1)))(jnp.asarray(s), jnp.asarray(t))
  assert np.all(np.isfinite(gs)) and np.abs(gs).max() > 0
  assert np.abs(gt).max() == 0


def test_crd_loss_gradient():
  s = jnp.asarray(RNG.uniform(1e-4, 1e-2, (4, 9)), jnp.float32)
  t = jnp.asarray(RNG.uniform(1e-4, 1e-2, (4, 9)), jnp.float32)
  f = lambda a, b: L.crd_loss(a, b, num_data=100)
  g = jax.jit(jax.grad(f))(s, t)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
