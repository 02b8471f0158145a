"""The methods' trainable modules: FitNet and VID regressors, CRD's heads, memory bank and
samplers (update semantics and a checkpoint round trip), OFD's connector and margins."""
from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax.distill import base, crd, fitnet, ofd, vid
from reviewkd_jax.losses import methods as L

RNG = np.random.default_rng(1)


def _rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _unit(*shape):
  x = RNG.standard_normal(shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------- FitNet


@pytest.mark.parametrize('hs, ht', [(16, 8), (4, 8), (10, 8), (8, 8)])
def test_fitnet_regressor_matches_torch_conv_reg(hs, ht):
  """Each of ConvReg's three branches against PyTorch's layer with the same weights."""
  torch = pytest.importorskip('torch')
  x = _rand(2, hs, hs, 3)
  reg = fitnet.FitNetRegressor(teacher_channels=5, teacher_size=ht)
  variables = reg.init(jax.random.key(0), x, train=False)
  y = jax.jit(functools.partial(reg.apply, train=False))(variables, x)
  assert y.shape == (2, ht, ht, 5)
  kernel = np.asarray(variables['params']['conv']['kernel'])
  bias = torch.from_numpy(np.array(variables['params']['conv']['bias']))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  if 2 * hs == ht:
    # PyTorch's transposed conv is the adjoint of a conv: its kernel is Flax's, flipped.
    w = torch.from_numpy(kernel[::-1, ::-1].transpose(2, 3, 0, 1).copy())
    out = torch.nn.functional.conv_transpose2d(xt, w, bias, stride=2, padding=1)
  else:
    w = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    stride, pad = (2, 1) if hs == 2 * ht else (1, 0)
    out = torch.nn.functional.conv2d(xt, w, bias, stride=stride, padding=pad)
  # Freshly initialised BN in eval mode: x / sqrt(1 + eps); then ReLU.
  want = np.maximum(out.numpy().transpose(0, 2, 3, 1) / math.sqrt(1 + 1e-5), 0)
  np.testing.assert_allclose(y, want, atol=1e-5)


def test_fitnet_regressor_rejects_impossible_sizes():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError):
    fitnet.FitNetRegressor(5, 16).init(jax.random.key(0), x, train=False)


# ------------------------------------------------------------------------------- VID


def test_vid_regressor_matches_numpy_and_initial_variance():
  x = _rand(2, 8, 8, 3)
  reg = vid.VIDRegressor(target_channels=6, target_size=4)
  variables = reg.init(jax.random.key(0), x)
  mu, var = jax.jit(reg.apply)(variables, x)
  p = variables['params']
  assert set(p) == {'conv0', 'conv1', 'conv2', 'log_scale'}    # no biases
  np.testing.assert_allclose(var, np.full(6, 5.0), rtol=1e-6)
  # numpy: 2x2 average pooling to the teacher's 4x4, then three 1x1 convs with ReLUs.
  h = x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4)).astype(np.float64)
  for i in range(3):
    if i:
      h = np.maximum(h, 0)
    h = h @ np.asarray(p[f'conv{i}']['kernel'])[0, 0]
  np.testing.assert_allclose(mu, h, rtol=1e-4, atol=1e-5)
  assert mu.shape == (2, 4, 4, 6)
  # The loss the pair feeds, against numpy.
  t = _rand(2, 4, 4, 6)
  want = np.mean(0.5 * ((h - t) ** 2 / 5.0 + math.log(5.0)))
  np.testing.assert_allclose(jax.jit(L.vid_loss)([mu], [var], [t]), want, rtol=1e-4)


def test_vid_log_scale_gets_gradient():
  x, t = _rand(2, 4, 4, 3), _rand(2, 4, 4, 6)
  reg = vid.VIDRegressor(target_channels=6)
  params = reg.init(jax.random.key(0), x)['params']

  def loss(p):
    mu, var = reg.apply({'params': p}, x)
    return L.vid_loss([mu], [var], [t])

  g = jax.jit(jax.grad(loss))(params)
  assert np.abs(g['log_scale']).min() > 0 and np.abs(g['conv0']['kernel']).max() > 0


# ------------------------------------------------------------------------------- CRD


def _np_scores(bank, v, cidx, temperature):
  return np.exp(np.einsum('bkd,bd->bk', bank.astype(np.float64)[cidx], v) / temperature)


def _np_update(bank, v, idx, m=0.5):
  rows = m * bank.astype(np.float64)[idx] + (1 - m) * v
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_contrast_memory_scores_z_and_momentum_update():
  n, d, b, k, temp = 40, 8, 4, 6, 0.07
  mem = crd.ContrastMemory(num_data=n, feat_dim=d)
  v1, v2 = _unit(b, d), _unit(b, d)
  idx = np.array([3, 17, 0, 39])
  cidx = np.concatenate([idx[:, None], RNG.integers(0, n, (b, k))], axis=1)
  variables = jax.jit(mem.init)(jax.random.key(0), v1, v2, idx, cidx)
  bank = variables['memory']
  stdv = 1 / math.sqrt(d / 3)
  for name in ('memory_v1', 'memory_v2'):
    assert bank[name].shape == (n, d) and np.abs(bank[name]).max() <= stdv
  assert not np.allclose(bank['memory_v1'], bank['memory_v2'])
  np.testing.assert_array_equal(bank['z'], [-1.0, -1.0])

  step = jax.jit(functools.partial(mem.apply, mutable=['memory']))
  (out_v1, out_v2), new = step(variables, v1, v2, idx, cidx)
  new = new['memory']
  old1, old2 = np.asarray(bank['memory_v1']), np.asarray(bank['memory_v2'])
  e1 = _np_scores(old2, v1, cidx, temp)      # student anchored on the teacher bank
  e2 = _np_scores(old1, v2, cidx, temp)
  z = np.array([e1.mean() * n, e2.mean() * n])
  np.testing.assert_allclose(new['z'], z, rtol=1e-5)
  np.testing.assert_allclose(out_v1, e1 / z[0], rtol=1e-4)
  np.testing.assert_allclose(out_v2, e2 / z[1], rtol=1e-4)
  # Momentum 0.5 then renormalisation at idx; every other row bit-identical.
  np.testing.assert_allclose(new['memory_v1'][idx], _np_update(old1, v1, idx), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(new['memory_v2'][idx], _np_update(old2, v2, idx), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new['memory_v1'][idx], axis=1), 1.0, rtol=1e-6)
  others = np.setdiff1d(np.arange(n), idx)
  np.testing.assert_array_equal(new['memory_v1'][others], old1[others])
  np.testing.assert_array_equal(new['memory_v2'][others], old2[others])

  # Second batch: Z stays at the first batch's value and scores use the updated bank.
  w1, w2 = _unit(b, d), _unit(b, d)
  (o1, _), newer = step({'memory': new}, w1, w2, idx, cidx)
  np.testing.assert_array_equal(newer['memory']['z'], new['z'])
  np.testing.assert_allclose(
      o1, _np_scores(np.asarray(new['memory_v2']), w1, cidx, temp) / z[0], rtol=1e-4)

  # Read-only apply leaves the bank alone (nothing is returned to update).
  out_ro = jax.jit(mem.apply)({'memory': new}, w1, w2, idx, cidx)
  np.testing.assert_allclose(out_ro[0], o1, rtol=1e-5)


def test_memory_bank_survives_checkpoint_round_trips(tmp_path):
  n, d, b = 30, 8, 4
  head = crd.CRDHead(num_data=n, feat_dim=d)
  fs, ft, idx = _rand(b, 6), _rand(b, 10), np.array([1, 2, 3, 4])

  def negatives(key):
    return crd.uniform_contrast_idx(key, idx, num_data=n, num_negatives=5)

  variables = jax.jit(head.init)(jax.random.key(0), fs, ft, idx, negatives(jax.random.key(1)))
  step = jax.jit(lambda v, key: head.apply(v, fs, ft, idx, negatives(key), mutable=['memory']))
  _, mem = step(variables, jax.random.key(2))
  trained = {'params': variables['params'], 'memory': mem['memory']}
  assert not np.array_equal(trained['memory']['contrast']['memory_v1'],
                            variables['memory']['contrast']['memory_v1'])

  # flax serialization against the freshly initialised template.
  restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(trained))
  jax.tree.map(np.testing.assert_array_equal, restored, trained)
  # orbax.
  ocp = pytest.importorskip('orbax.checkpoint')
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'crd', trained)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / 'crd', variables)
  jax.tree.map(np.testing.assert_array_equal, restored, trained)
  # The restored bank behaves exactly as the live one.
  a, mem_a = step(trained, jax.random.key(3))
  c, mem_c = step(restored, jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, (a, mem_a), (c, mem_c))


def test_crd_head_gradients_and_loss():
  n, b, k = 50, 4, 7
  head = crd.CRDHead(num_data=n, feat_dim=6)
  fs, ft, idx = _rand(b, 5), _rand(b, 9), np.array([0, 10, 20, 30])
  cidx = crd.uniform_contrast_idx(jax.random.key(5), idx, num_data=n, num_negatives=k)
  variables = jax.jit(head.init)(jax.random.key(0), fs, ft, idx, cidx)
  p = variables['params']
  assert p['embed_s']['linear']['kernel'].shape == (5, 6)
  assert p['embed_t']['linear']['kernel'].shape == (9, 6)
  assert 'contrast' not in p                  # the bank is state, not a parameter

  def loss(params, s, t):
    (os_, ot), _ = head.apply({'params': params, 'memory': variables['memory']}, s, t, idx,
                              cidx, mutable=['memory'])
    return L.crd_loss(os_, ot, num_data=n)

  value, (gp, gs, gt) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(p, fs, ft)
  assert np.isfinite(value) and value > 0
  assert np.abs(gp['embed_s']['linear']['kernel']).max() > 0
  assert np.abs(gp['embed_t']['linear']['kernel']).max() > 0   # the teacher head trains
  assert np.abs(gs).max() > 0
  assert np.abs(gt).max() == 0                                  # the teacher net does not
  # Embeddings are unit vectors.
  emb = jax.jit(crd.Embed(6).apply)({'params': p['embed_s']}, fs)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)


def test_uniform_sampler():
  idx = jnp.array([5, 6, 7])
  c = crd.uniform_contrast_idx(jax.random.key(0), idx, num_data=20, num_negatives=4000)
  assert c.shape == (3, 4001)
  np.testing.assert_array_equal(c[:, 0], idx)
  counts = np.bincount(np.asarray(c[:, 1:]).ravel(), minlength=20)
  assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600 and c.max() < 20


def test_other_class_sampler_is_uniform_over_other_classes():
  # Unbalanced, shuffled labels: class 0 x3, class 1 x5, class 2 x2.
  labels = np.array([1, 0, 2, 1, 1, 0, 2, 1, 0, 1])
  index = crd.class_index(labels)
  idx = jnp.array([1, 0, 2, 3])            # classes 0, 1, 2, 1
  cidx = jax.jit(functools.partial(crd.other_class_contrast_idx, num_negatives=6000))(
      jax.random.key(0), idx, jnp.asarray(labels[np.asarray(idx)]), index)
  cidx = np.asarray(cidx)
  np.testing.assert_array_equal(cidx[:, 0], idx)
  for row, i in zip(cidx, np.asarray(idx)):
    neg = row[1:]
    assert np.all(labels[neg] != labels[i])
    allowed = np.flatnonzero(labels != labels[i])
    counts = np.bincount(neg, minlength=10)[allowed]
    expected = 6000 / len(allowed)
    assert counts.min() > 0.85 * expected and counts.max() < 1.15 * expected


# ------------------------------------------------------------------------------- OFD


def test_ofd_margin_matches_scipy_truncated_normal():
  stats = pytest.importorskip('scipy.stats')
  scale = np.array([1.0, 0.5, -2.0, 0.3, 1.2, 0.1], np.float32)
  bias = np.array([0.0, 0.7, -1.0, 0.2, 4.0, 0.5], np.float32)
  got = ofd.ofd_margin(scale, bias)
  assert got.dtype == np.float32
  s, m = np.abs(scale.astype(np.float64)), bias.astype(np.float64)
  # E[x | x < 0] for x ~ N(m, s^2), from scipy's truncated normal; -3s where P(x<0)<=1e-3.
  trunc = stats.truncnorm.mean(-np.inf, (0 - m) / s, loc=m, scale=s)
  want = np.where(stats.norm.cdf(-m / s) > 1e-3, trunc, -3 * s)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Hand-worked: m = 0 gives -s sqrt(2/pi); the last two channels take the -3s branch.
  np.testing.assert_allclose(got[0], -math.sqrt(2 / math.pi), rtol=1e-6)
  np.testing.assert_allclose(got[4:], [-3.6, -0.3], rtol=1e-6)
  assert np.all(got < 0)


def test_ofd_margin_by_numerical_integration():
  s, m = 0.8, 0.4
  x = np.linspace(-12.0, 0.0, 200001)
  pdf = np.exp(-((x - m) / s) ** 2 / 2)
  want = np.trapezoid(x * pdf, x) / np.trapezoid(pdf, x)
  np.testing.assert_allclose(ofd.ofd_margin([s], [m])[0], want, rtol=1e-5)


def test_ofd_connector_and_margins_from_params():
  x = _rand(2, 4, 4, 3)
  conn = ofd.OFDConnector(teacher_channels=7)
  variables = conn.init(jax.random.key(0), x, train=True)
  y, state = conn.apply(variables, x, train=True, mutable=['batch_stats'])
  assert y.shape == (2, 4, 4, 7)
  p = variables['params']
  assert set(p) == {'conv', 'bn'} and 'bias' not in p['conv']
  np.testing.assert_array_equal(p['bn']['scale'], np.ones(7))
  np.testing.assert_array_equal(p['bn']['bias'], np.zeros(7))
  # Training-mode BN with unit scale and zero shift: per-channel mean 0, variance 1.
  np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1, 2)), 0, atol=1e-5)
  teacher = {'stage': {'bn': {'scale': np.array([1.0, 2.0]), 'bias': np.array([0.0, 0.0])}}}
  (margin,) = ofd.ofd_margins_from_params(teacher, ['stage/bn'])
  np.testing.assert_allclose(margin, -np.array([1.0, 2.0]) * math.sqrt(2 / math.pi),
                             rtol=1e-6)


# ------------------------------------------------------------------------------- features


def test_benchmark_features_order():
  f = {'stem': 's', 'stages': ['a', 'b', 'c'], 'preact': ['pa', 'pb', 'pc'], 'pooled': 'p'}
  assert base.benchmark_features(f) == ['s', 'a', 'b', 'c', 'p']
  assert base.benchmark_features(f, preact=True) == ['s', 'pa', 'pb', 'pc', 'p']
