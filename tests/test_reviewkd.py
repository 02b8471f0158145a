"""ABF and the ReviewKD student against the authors' PyTorch modules; gradient routing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import convert, losses
from reviewkd_jax.distill import reviewkd
from reviewkd_jax.models import layers

torch = pytest.importorskip('torch')
tnn = torch.nn
F = torch.nn.functional
from tests import torch_utils  # noqa: E402
from reviewkd_jax.testing import torch_reviewkd as torch_ref  # noqa: E402


# ---- A tiny two-stage backbone, in both frameworks with the same layer names ----
class TorchTiny(tnn.Module):

  def __init__(self, width=(6, 10), num_classes=5):
    super().__init__()
    self.conv1, self.bn1 = tnn.Conv2d(3, 4, 3, 1, 1, bias=False), tnn.BatchNorm2d(4)
    self.layer1 = tnn.Sequential(tnn.Conv2d(4, width[0], 3, 2, 1, bias=False),
                                 tnn.BatchNorm2d(width[0]))
    self.layer2 = tnn.Sequential(tnn.Conv2d(width[0], width[1], 3, 2, 1, bias=False),
                                 tnn.BatchNorm2d(width[1]))
    self.fc = tnn.Linear(width[1], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    f1 = F.relu(self.layer1(x))
    f2 = F.relu(self.layer2(f1))
    pooled = F.adaptive_avg_pool2d(f2, 1)
    return [f1, f2, pooled], self.fc(pooled.flatten(1))


class FlaxTiny(nn.Module):
  width: tuple = (6, 10)
  num_classes: int = 5
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    bn = lambda name: layers.batch_norm(train, name=name, dtype=self.dtype)
    x = nn.relu(bn('bn1')(layers.conv(4, 3, name='conv1', dtype=self.dtype)(x)))
    stem = x
    pre1 = bn('layer1_1')(layers.conv(self.width[0], 3, stride=2, name='layer1_0',
                                      dtype=self.dtype)(x))
    f1 = nn.relu(pre1)
    pre2 = bn('layer2_1')(layers.conv(self.width[1], 3, stride=2, name='layer2_0',
                                      dtype=self.dtype)(f1))
    f2 = nn.relu(pre2)
    pooled = layers.global_avg_pool(f2)
    logits = layers.linear(self.num_classes, self.width[1], name='fc', dtype=self.dtype)(pooled)
    return layers.model_output(logits, stem, [f1, f2], [pre1, pre2], pooled)


TEACHER_CHANNELS = (7, 12, 9)  # two maps + pooled, all different from the student's
TEACHER_SIZES = (16, 4, 1)  # teacher maps larger/smaller than the student's 8 and 4


def _pair(seed=0):
  t_model = torch_ref.ReviewKD(TorchTiny(), in_channels=[6, 10, 10], out_channels=TEACHER_CHANNELS,
                          shapes=[1, 4, 8], out_shapes=[1, 4, 16], mid_channel=10)
  torch_utils.randomize(t_model, seed)
  f_model = reviewkd.ReviewKDStudent(FlaxTiny(), teacher_channels=TEACHER_CHANNELS,
                                     teacher_sizes=TEACHER_SIZES)
  x = np.random.default_rng(seed).standard_normal((4, 16, 16, 3)).astype(np.float32)
  template = jax.eval_shape(lambda: f_model.init(jax.random.key(0), x, train=False))
  variables = convert.torch_to_flax(t_model.state_dict(), template)
  return t_model, f_model, variables, x


@pytest.mark.parametrize('train', [False, True])
def test_reviewkd_student_matches_authors_wrapper(train):
  t_model, f_model, variables, x = _pair()
  t_model.train(train)
  t_out, t_logits = t_model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  if train:
    (logits, _, fused), updates = f_model.apply(variables, x, train=True,
                                                mutable=['batch_stats'])
    # Running statistics updated exactly as PyTorch's (unbiased variance), incl. the 1x1 level.
    ref = convert.torch_to_flax(t_model.state_dict(), variables)['batch_stats']
    for a, b in zip(jax.tree_util.tree_leaves(updates['batch_stats']),
                    jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(a, b, atol=1e-5)
  else:
    logits, _, fused = f_model.apply(variables, x, train=False)
  assert [f.shape for f in fused] == [(4, 16, 16, 7), (4, 4, 4, 12), (4, 1, 1, 9)]
  np.testing.assert_allclose(logits, t_logits.detach().numpy(), atol=1e-4)
  for ours, theirs in zip(fused, t_out):
    np.testing.assert_allclose(ours, torch_utils.nchw_to_nhwc(theirs), atol=1e-4)


def test_abf_fusion_arithmetic_by_hand():
  """With identity transforms, the fusion is x*sigmoid(a) + up(y)*sigmoid(b), then resize."""
  abf = reviewkd.ABF(mid_channels=2, out_channels=2, fuse=True)
  x = np.random.default_rng(0).standard_normal((1, 2, 2, 2)).astype(np.float32)
  y = np.random.default_rng(1).standard_normal((1, 1, 1, 2)).astype(np.float32)
  v = abf.init(jax.random.key(0), x, y, out_size=4, train=False)
  p = jax.tree_util.tree_map(np.asarray, v)
  p['params']['conv1_0']['kernel'] = np.eye(2, dtype=np.float32)[None, None]
  att = np.zeros((1, 1, 4, 2), np.float32)
  att[0, 0, 0, 0] = 1.0  # gate for x = sigmoid(x[..., 0] + 0.5)
  att[0, 0, 3, 1] = -2.0  # gate for y = sigmoid(-2 * y[..., 1])
  p['params']['att_conv_0']['kernel'] = att
  p['params']['att_conv_0']['bias'] = np.array([0.5, 0.0], np.float32)
  out, residual = abf.apply(p, x, y, out_size=4, train=False)
  sig = lambda a: 1 / (1 + np.exp(-a))
  yy = np.broadcast_to(y, x.shape)
  za = sig(x[..., 0:1] + 0.5)
  zb = sig(-2.0 * yy[..., 1:2])
  fused = x * za + yy * zb
  expected = fused.repeat(2, axis=1).repeat(2, axis=2)  # nearest 2x upsampling
  np.testing.assert_allclose(residual, expected, rtol=1e-5, atol=1e-6)
  assert out.shape == (1, 4, 4, 2)


@pytest.mark.parametrize('n_in,n_out', [(1, 7), (2, 7), (4, 7), (7, 14), (14, 28), (8, 4),
                                        (7, 4), (5, 3), (3, 8)])
def test_nearest_resize_matches_torch(n_in, n_out):
  x = np.random.default_rng(n_in).standard_normal((1, n_in, n_in, 2)).astype(np.float32)
  ours = reviewkd.nearest_resize(jnp.asarray(x), (n_out, n_out))
  ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), (n_out, n_out), mode='nearest')
  np.testing.assert_array_equal(np.asarray(ours), torch_utils.nchw_to_nhwc(ref))


def test_mid_channels_derived_and_overridable():
  _, f_model, variables, _ = _pair()
  # Derived: min(512, C of the deepest student level) = 10.
  assert variables['params']['abfs_0']['conv1_0']['kernel'].shape == (1, 1, 10, 10)
  override = f_model.clone(mid_channels=3)
  v = jax.eval_shape(lambda: override.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                                  train=False))
  assert v['params']['abfs_2']['conv1_0']['kernel'].shape == (1, 1, 6, 3)
  assert v['params']['abfs_1']['att_conv_0']['kernel'].shape == (1, 1, 6, 2)
  assert 'att_conv_0' not in v['params']['abfs_0']  # the deepest level does not fuse


def test_level_count_mismatch_is_a_clear_error():
  bad = reviewkd.ReviewKDStudent(FlaxTiny(), teacher_channels=(7, 9), teacher_sizes=(16, 1))
  with pytest.raises(ValueError, match='same number of stages'):
    bad.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


def test_gradients_reach_student_and_abfs_never_teacher():
  """CE + lambda * HCL: non-zero grads on every student/ABF leaf, none on the teacher."""
  _, student, s_vars, x = _pair()
  teacher = FlaxTiny(width=(7, 9))
  # The teacher's review levels must match the ABF outputs: give it matching sizes.
  student = student.clone(teacher_channels=(7, 9, 9), teacher_sizes=(8, 4, 1))
  s_vars = jax.jit(student.init, static_argnames='train')(jax.random.key(1), x, train=False)
  t_vars = jax.jit(teacher.init, static_argnames='train')(jax.random.key(2), x, train=False)
  labels = jnp.arange(4) % 5

  def loss_fn(s_params, t_params):
    (logits, _, fused), _ = student.apply({**s_vars, 'params': s_params}, x, train=True,
                                          mutable=['batch_stats'])
    _, t_feats = teacher.apply({**t_vars, 'params': t_params}, x, train=False)
    t_levels = jax.lax.stop_gradient(reviewkd.review_features(t_feats, 'preact'))
    return losses.cross_entropy(logits, labels) + 0.6 * losses.hcl(fused, t_levels)

  g_s, g_t = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(s_vars['params'], t_vars['params'])
  for path, g in jax.tree_util.tree_leaves_with_path(g_s):
    assert float(jnp.abs(g).max()) > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'
  assert set(g_s) == {'student', 'abfs_0', 'abfs_1', 'abfs_2'}
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(g_t))


def test_feature_spec_and_review_features():
  channels, sizes = reviewkd.feature_spec(FlaxTiny(), (1, 16, 16, 3), 'preact')
  assert channels == [6, 10, 10] and sizes == [(8, 8), (4, 4), (1, 1)]
  with pytest.raises(ValueError, match='feature kind'):
    reviewkd.review_features({}, 'post')
