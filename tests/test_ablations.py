"""ReviewKD's ablation switches (docs/ablations.md): each variant's loss on a small random
pyramid against a direct numpy computation of its formula; the defaults against a frozen copy
of the method as it was before the switches (bit for bit); the config checks; the two
ablation configs and their published numbers; a command in the docs for every table cell."""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar100_ablation_components as components
from configs import cifar100_ablation_stages as stages
from configs import default, pairs
from reviewkd_jax import losses
from reviewkd_jax.distill import base, reviewkd
from reviewkd_jax.models import ModelOutput, layers
from reviewkd_jax.train import check_config, get_method
from tests.helpers import ROOT


# ---- A tiny backbone: two stages (8 and 4 px) + pooled, i.e. three review levels ----
class Tiny(nn.Module):
  width: tuple = (6, 10)

  @nn.compact
  def __call__(self, x, *, train):
    bn = lambda name: layers.batch_norm(train, name=name)
    x = nn.relu(bn('bn1')(layers.conv(4, 3, name='conv1')(x)))
    pre1 = bn('layer1_1')(layers.conv(self.width[0], 3, stride=2, name='layer1_0')(x))
    f1 = nn.relu(pre1)
    pre2 = bn('layer2_1')(layers.conv(self.width[1], 3, stride=2, name='layer2_0')(f1))
    f2 = nn.relu(pre2)
    pooled = layers.global_avg_pool(f2)
    logits = layers.linear(5, self.width[1], name='fc')(pooled)
    return layers.model_output(logits, x, [f1, f2], [pre1, pre2], pooled)


# Teacher levels larger (16 > 8), equal (4) and equal (1) to the student's, other channels:
# the transforms upsample, downsample (student pooled -> 16 px, student 8 px -> 4 px) and keep.
TEACHER_CHANNELS = (7, 12, 9)
TEACHER_SIZES = ((16, 16), (4, 4), (1, 1))
BATCH = 4


def _randomize(tree, seed):
  """Random values for every leaf: params ~ N(0, 0.5), running variances in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return (0.5 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, jax.tree.map(np.asarray, tree))


def _teacher_out(seed):
  rng = np.random.default_rng(seed)
  maps = [rng.standard_normal((BATCH, h, w, c)).astype(np.float32)
          for c, (h, w) in zip(TEACHER_CHANNELS[:-1], TEACHER_SIZES[:-1])]
  pooled = rng.standard_normal((BATCH, TEACHER_CHANNELS[-1])).astype(np.float32)
  features = {'stem': None, 'stages': maps, 'preact': maps, 'pooled': pooled}
  return ModelOutput(np.zeros((BATCH, 5), np.float32), features)


def _config(**switches):
  config = default.get_config()
  config.update(method='reviewkd', teacher='resnet8', reviewkd_weight=0.7,
                reviewkd_warmup_epochs=20)
  config.update(switches)
  return config


def _run(config, *, train, seed=0):
  """Returns (module, variables, student output, teacher output, loss terms, logs)."""
  module = reviewkd.ReviewKDStudent(Tiny(), TEACHER_CHANNELS, TEACHER_SIZES,
                                    **reviewkd.config_switches(config))
  x = np.random.default_rng(seed).standard_normal((BATCH, 16, 16, 3)).astype(np.float32)
  variables = _randomize(module.init(jax.random.key(0), x, train=False), seed + 1)
  if train:
    out, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
  else:
    out = module.apply(variables, x, train=False)
  teacher_out = _teacher_out(seed + 2)
  ctx = base.LossContext(config=config, student_out=out, teacher_out=teacher_out, images=x,
                         batch={}, epoch=jnp.asarray(5, jnp.int32), rng=jax.random.key(0))
  terms, logs = get_method('reviewkd').loss_terms(ctx)
  return module, variables, out, teacher_out, terms, logs


# ---- The formulas, in numpy ----

def np_conv(x, kernel):
  """Convolution with 'same' padding (odd kernels), stride 1, NHWC / HWIO."""
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros((*x.shape[:3], kernel.shape[-1]), np.float64)
  for dy in range(k):
    for dx in range(k):
      out += np.einsum('nhwc,cd->nhwd', xp[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
  return out


def np_bn(x, params, stats, train):
  if train:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  else:
    mean, var = stats['mean'], stats['var']
  return (x - mean) / np.sqrt(var + 1e-5) * params['scale'] + params['bias']


def np_resize(x, size):
  """PyTorch's nearest rule: output index i reads floor(i * in / out)."""

  def index(n_in, n_out):
    return np.minimum(np.floor(np.arange(n_out) * np.float32(n_in / n_out)).astype(int),
                      n_in - 1)

  return x[:, index(x.shape[1], size[0])][:, :, index(x.shape[2], size[1])]


def np_pool(x, l):
  h, w = x.shape[1:3]
  out = np.zeros((x.shape[0], l, l, x.shape[3]))
  for i in range(l):
    for j in range(l):
      hs, he = (i * h) // l, math.ceil((i + 1) * h / l)
      ws, we = (j * w) // l, math.ceil((j + 1) * w / l)
      out[:, i, j] = x[:, hs:he, ws:we].mean(axis=(1, 2))
  return out


def np_mse(a, b):
  return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)


def np_hcl(fs, ft):
  loss, weight, total = np_mse(fs, ft), 1.0, 1.0
  for l in (4, 2, 1):
    if l >= fs.shape[1]:
      continue
    weight /= 2
    loss += weight * np_mse(np_pool(fs, l), np_pool(ft, l))
    total += weight
  return loss / total


def np_transform(x, v, train):
  """M_s^{i,j}: 1x1 conv + BN to the teacher level's channels (the resize follows)."""
  return np_bn(np_conv(x, v['params']['conv']['kernel']), v['params']['bn'],
               v.get('batch_stats', {}).get('bn'), train)


def np_chain(levels, params, stats, fusion, train):
  """The residual chain U, deepest first; returns the outputs shallow to deep."""
  n = len(levels)
  outs, residual = [None] * n, None
  for k, level in enumerate(reversed(range(n))):
    p, s = params[f'abfs_{k}'], stats[f'abfs_{k}']
    x = np_bn(np_conv(levels[level], p['conv1_0']['kernel']), p['conv1_1'], s['conv1_1'], train)
    if residual is not None:
      y = np_resize(residual, x.shape[1:3])
      if fusion == 'sum':
        x = x + y
      else:
        z = np_conv(np.concatenate([x, y], -1), p['att_conv_0']['kernel'])
        z = 1 / (1 + np.exp(-(z + p['att_conv_0']['bias'])))
        x = x * z[..., 0:1] + y * z[..., 1:2]
    x = np_resize(x, TEACHER_SIZES[level])
    outs[level] = np_bn(np_conv(x, p['conv2_0']['kernel']), p['conv2_1'], s['conv2_1'], train)
    residual = x
  return outs


def np_loss(config, variables, student_features, teacher_features, train):
  """The variant's loss, lambda and warm-up included, straight from its formula."""
  d = np_hcl if config.reviewkd_distance == 'hcl' else np_mse
  s = [np.asarray(f, np.float64) for f in reviewkd.review_features(student_features, 'stages')]
  t = [np.asarray(f, np.float64) for f in reviewkd.review_features(teacher_features, 'preact')]
  n = len(s)
  params, stats = variables['params'], variables['batch_stats']

  def m(i, j):  # M_s^{i,j}(F_s^i), 0-based levels
    name = f'pair_s{i + 1}_t{j + 1}'
    return np_resize(np_transform(s[i], {'params': params[name],
                                         'batch_stats': stats[name]}, train),
                     TEACHER_SIZES[j])

  if config.reviewkd_student_stage:  # L_SKD = D(M_s^{i,j}(F_s^i), F_t^j)
    i, j = config.reviewkd_student_stage - 1, config.reviewkd_teacher_stage - 1
    loss = d(m(i, j), t[j])
  elif config.reviewkd_residual:  # D(F_s^n', F_t^n) + sum_j D(U(F_s^j..F_s^n), F_t^j)
    outs = np_chain(s, params, stats, config.reviewkd_fusion, train)
    loss = sum(d(outs[j], t[j]) for j in range(n))
  elif config.reviewkd_review:  # L_MKD-R = sum_i sum_{j <= i} D(M_s^{i,j}(F_s^i), F_t^j)
    loss = sum(d(m(i, j), t[j]) for i in range(n) for j in range(i + 1))
  else:  # L_MKD = sum_i D(M_s^{i,i}(F_s^i), F_t^i)
    loss = sum(d(m(i, i), t[i]) for i in range(n))
  return config.reviewkd_weight * min(1.0, 5 / 20) * loss


# name -> config switches: every row of Table 7, and single pairs across the resize cases.
VARIANTS = {
    **{f'table7_{row.name}': row.switches() for row in components.ROWS},
    **{f'pair_s{i}_t{j}': dict(reviewkd_review=False, reviewkd_residual=False,
                               reviewkd_fusion='none', reviewkd_distance='mse',
                               reviewkd_student_stage=i, reviewkd_teacher_stage=j)
       for i, j in ((1, 1), (1, 3), (2, 1), (3, 1), (3, 2), (2, 3))},
    'pair_s2_t1_hcl': dict(reviewkd_review=False, reviewkd_residual=False,
                           reviewkd_fusion='none', reviewkd_distance='hcl',
                           reviewkd_student_stage=2, reviewkd_teacher_stage=1),
}


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_variant_loss_matches_its_formula_in_numpy(variant, train):
  config = _config(**VARIANTS[variant])
  check_config(config)
  _, variables, out, teacher_out, terms, logs = _run(config, train=train)
  name = config.reviewkd_distance
  assert set(terms) == {name} and set(logs) == {name, 'lambda'}
  expected = np_loss(config, variables, out.features, teacher_out.features, train)
  np.testing.assert_allclose(float(terms[name]), expected, rtol=2e-5)
  np.testing.assert_allclose(float(logs['lambda']), 0.7 * 5 / 20, rtol=1e-6)


def test_head_layout_of_each_variant():
  """The head's modules and outputs: one transform per pair, or the chain of ABFs."""
  expected = {
      'table7_baseline': ['pair_s1_t1', 'pair_s2_t2', 'pair_s3_t3'],
      'table7_rm': ['pair_s1_t1', 'pair_s2_t1', 'pair_s2_t2', 'pair_s3_t1', 'pair_s3_t2',
                    'pair_s3_t3'],
      'table7_rm_rlf': ['abfs_0', 'abfs_1', 'abfs_2'],
      'pair_s2_t3': ['pair_s2_t3'],
  }
  for variant, names in expected.items():
    config = _config(**VARIANTS[variant])
    _, variables, out, _, _, _ = _run(config, train=False)
    assert sorted(k for k in variables['params'] if k != 'student') == names
    switches = reviewkd.config_switches(config)
    pairs_ = reviewkd.level_pairs(3, review=switches['review'], residual=switches['residual'],
                                  stage_pair=switches['stage_pair'])
    assert [o.shape for o in out.adapter] == [
        (BATCH, *TEACHER_SIZES[t], TEACHER_CHANNELS[t]) for _, t in pairs_]
  # The plain-sum chain has no attention convs; the attention chain has them but the deepest.
  _, v_sum, *_ = _run(_config(**VARIANTS['table7_rm_rlf']), train=False)
  _, v_abf, *_ = _run(_config(**VARIANTS['table7_rm_rlf_abf']), train=False)
  assert not any('att_conv_0' in v_sum['params'][f'abfs_{k}'] for k in range(3))
  assert ['att_conv_0' in v_abf['params'][f'abfs_{k}'] for k in range(3)] == [False, True, True]


@pytest.mark.parametrize('variant', ['table7_baseline', 'table7_rm', 'table7_rm_rlf',
                                     'pair_s3_t1'])
def test_gradients_reach_every_transform(variant):
  config = _config(**VARIANTS[variant])
  module, variables, _, teacher_out, _, _ = _run(config, train=True)
  x = np.random.default_rng(0).standard_normal((BATCH, 16, 16, 3)).astype(np.float32)

  def loss_fn(params):
    out, _ = module.apply({**variables, 'params': params}, x, train=True,
                          mutable=['batch_stats'])
    ctx = base.LossContext(config=config, student_out=out, teacher_out=teacher_out, images=x,
                           batch={}, epoch=jnp.asarray(20), rng=jax.random.key(0))
    terms, _ = get_method('reviewkd').loss_terms(ctx)
    return base.total_loss(terms)

  grads = jax.jit(jax.grad(loss_fn))(variables['params'])  # one program, not op by op
  for name, tree in grads.items():
    if name == 'student':
      continue
    for path, g in jax.tree_util.tree_leaves_with_path(tree):
      assert float(jnp.abs(g).max()) > 0, f'no gradient reaches {name}{jax.tree_util.keystr(path)}'


# ---- The defaults are the method, bit for bit ----

class _ABFBefore(nn.Module):
  """reviewkd.ABF as it was before the ablation switches (verbatim)."""
  mid_channels: int
  out_channels: int
  fuse: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, *, out_size, train):
    x = layers.conv(self.mid_channels, 1, name='conv1_0', dtype=self.dtype,
                    kernel_init=layers.kaiming_uniform_a1)(x)
    x = layers.batch_norm(train, name='conv1_1', dtype=self.dtype)(x)
    if self.fuse:
      y = reviewkd.nearest_resize(residual, (x.shape[1], x.shape[2])).astype(x.dtype)
      z = layers.conv(2, 1, use_bias=True, in_features=2 * self.mid_channels,
                      kernel_init=layers.torch_default_kernel_init, name='att_conv_0',
                      dtype=self.dtype)(jnp.concatenate([x, y], axis=-1))
      z = nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    x = reviewkd.nearest_resize(x, reviewkd._hw(out_size))  # pylint: disable=protected-access
    out = layers.conv(self.out_channels, 3, name='conv2_0', dtype=self.dtype,
                      kernel_init=layers.kaiming_uniform_a1)(x)
    out = layers.batch_norm(train, name='conv2_1', dtype=self.dtype)(out)
    return out, x


class _ReviewKDStudentBefore(nn.Module):
  """reviewkd.ReviewKDStudent as it was before the ablation switches (verbatim)."""
  student: nn.Module
  teacher_channels: Sequence[int]
  teacher_sizes: Sequence[Any]
  mid_channels: int | None = None
  student_features: str = 'stages'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    logits, feats = self.student(x, train=train)
    levels = reviewkd.review_features(feats, self.student_features)
    mid = self.mid_channels or min(512, levels[-1].shape[-1])
    fused = [None] * len(levels)
    residual = None
    for i, level in enumerate(reversed(range(len(levels)))):
      abf = _ABFBefore(mid, self.teacher_channels[level], fuse=i > 0, dtype=self.dtype,
                       name=f'abfs_{i}')
      fused[level], residual = abf(levels[level], residual,
                                   out_size=self.teacher_sizes[level], train=train)
    return base.DistillOutput(logits, feats, fused)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_everything_on_is_the_method_bit_for_bit(train):
  config = _config(**components.get_row('all').switches())
  assert reviewkd.config_switches(config) == reviewkd.config_switches(_config())
  module, variables, out, teacher_out, terms, logs = _run(config, train=train)
  before = _ReviewKDStudentBefore(Tiny(), TEACHER_CHANNELS, TEACHER_SIZES)
  x = np.random.default_rng(0).standard_normal((BATCH, 16, 16, 3)).astype(np.float32)
  # The same parameter names and shapes (the authors' checkpoints still load) ...
  template = jax.eval_shape(lambda: before.init(jax.random.key(0), x, train=False))
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), template) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), variables))
  # ... the same outputs, batch statistics and loss, bit for bit.
  if train:
    (ref, updates), (_, new_updates) = (
        before.apply(variables, x, train=True, mutable=['batch_stats']),
        module.apply(variables, x, train=True, mutable=['batch_stats']))
    jax.tree.map(np.testing.assert_array_equal, updates, new_updates)
  else:
    ref = before.apply(variables, x, train=False)
  for ours, theirs in zip(out.adapter, ref.adapter, strict=True):
    np.testing.assert_array_equal(ours, theirs)
  t_levels = reviewkd.review_features(teacher_out.features, 'preact')
  lam = 0.7 * base.warmup_factor(jnp.asarray(5, jnp.int32), 20)
  assert set(terms) == {'hcl'}
  np.testing.assert_array_equal(terms['hcl'], lam * losses.hcl(ref.adapter, t_levels))
  np.testing.assert_array_equal(logs['hcl'], losses.hcl(ref.adapter, t_levels))


def test_every_paper_config_keeps_the_method():
  for name in pairs.names():
    config = pairs.reviewkd_config(name)
    assert reviewkd.config_switches(config) == dict(review=True, residual=True, fusion='abf',
                                                    stage_pair=None)
    assert config.reviewkd_distance == 'hcl'


def test_feature_mse_is_hcl_without_the_pyramid():
  rng = np.random.default_rng(0)
  fs = [rng.standard_normal(s).astype(np.float32) for s in ((2, 8, 8, 3), (2, 1, 1, 4))]
  ft = [rng.standard_normal(s).astype(np.float32) for s in ((2, 8, 8, 3), (2, 1, 1, 4))]
  np.testing.assert_allclose(losses.feature_mse(fs, ft), np_mse(fs[0], ft[0]) +
                             np_mse(fs[1], ft[1]), rtol=1e-6)
  assert float(losses.feature_mse(fs[1:], ft[1:])) == float(losses.hcl_level(fs[1], ft[1]))
  with pytest.raises(ValueError, match='equal shapes'):
    losses.feature_mse(fs, ft[::-1])


# ---- Config checks ----

_OFF = dict(reviewkd_review=False, reviewkd_residual=False, reviewkd_fusion='none')


@pytest.mark.parametrize('fields,match', [
    (dict(reviewkd_fusion='attention'), "reviewkd_fusion must be one of .'abf', 'sum', 'none'"),
    (dict(reviewkd_distance='l2'), "reviewkd_distance must be one of .'hcl', 'mse'"),
    (dict(reviewkd_review=False), 'which is the review mechanism in residual form'),
    (dict(reviewkd_fusion='none'), "reviewkd_residual=True fuses the levels of the chain: set "
                                   "reviewkd_fusion='abf'"),
    (dict(reviewkd_residual=False), "reviewkd_fusion='abf' fuses the residual chain, which "
                                    'reviewkd_residual=False removes'),
    (dict(reviewkd_residual=False, reviewkd_fusion='sum'), "reviewkd_fusion='sum' fuses"),
    (dict(reviewkd_student_stage=3), r'both 0 \(every level\) or both >= 1.*got \(3, 0\)'),
    (dict(reviewkd_student_stage=-1, reviewkd_teacher_stage=2), r'got \(-1, 2\)'),
    (dict(reviewkd_student_stage=3, reviewkd_teacher_stage=4),
     r'=\(3, 4\) distil one student stage from one teacher stage.*set reviewkd_review=False, '
     "reviewkd_residual=False and reviewkd_fusion='none'"),
    (dict(_OFF, reviewkd_review=True, reviewkd_student_stage=1, reviewkd_teacher_stage=1),
     'single-layer distillation'),
    (dict(_OFF, mid_channels=32), 'mid_channels=32 sets the width of the ABFs'),
])
def test_bad_combinations_say_what_to_set(fields, match):
  config = _config(**fields)
  with pytest.raises(ValueError, match=match):
    check_config(config)


def test_switches_must_be_booleans():
  # The config's type safety already refuses 1 for a bool field; modules built directly too.
  with pytest.raises(ValueError, match='reviewkd_residual must be True or False, got 1'):
    reviewkd.check_switches(review=True, residual=1, fusion='abf')


def test_stage_pair_out_of_range_is_a_clear_error():
  module = reviewkd.ReviewKDStudent(Tiny(), TEACHER_CHANNELS, TEACHER_SIZES, review=False,
                                    residual=False, fusion='none', stage_pair=(4, 1))
  with pytest.raises(ValueError, match=r'student 4, teacher 1\): the student has 3 review '
                                       r'levels \(2 stages \+ pooled\) and the teacher 3'):
    module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


# ---- The ablation configs and their published numbers ----

def test_stage_table_configs():
  assert len(stages.PUBLISHED) == 16 and stages.STUDENT_BASELINE == 69.1
  assert [stages.PUBLISHED[(3, 3)], stages.PUBLISHED[(4, 3)], stages.PUBLISHED[(3, 4)]] == [
      71.0, 70.3, 50.4]
  assert [stages.PUBLISHED[(i, 1)] for i in (1, 2, 3, 4)] == [69.5, 69.6, 69.2, 69.2]
  pair = pairs.get(stages.PAIR)
  for i, j in stages.PUBLISHED:
    config = stages.get_config(f'teacher_stage={j},student_stage={i}')
    check_config(config)
    assert (config.model, config.teacher) == ('resnet20', 'resnet56') == (
        pair.student, pair.teacher)
    assert (config.reviewkd_student_stage, config.reviewkd_teacher_stage) == (i, j)
    assert reviewkd.config_switches(config)['stage_pair'] == (i, j)
    assert (config.reviewkd_review, config.reviewkd_residual, config.reviewkd_fusion,
            config.reviewkd_distance) == (False, False, 'none', 'mse')
    # Everything else is the pair's ReviewKD recipe.
    expected = pairs.reviewkd_config(stages.PAIR)
    expected.update(_OFF, reviewkd_distance='mse', reviewkd_student_stage=i,
                    reviewkd_teacher_stage=j)
    assert config.to_dict() == expected.to_dict()
  with pytest.raises(ValueError, match="unknown teacher_stage '5'"):
    stages.get_config('student_stage=1,teacher_stage=5')


def test_component_table_configs():
  rows = {row.name: row for row in components.ROWS}
  assert [(r.rm, r.rlf, r.abf, r.hcl, r.published, r.variance) for r in components.ROWS] == [
      (False, False, False, False, 74.3, 5e-2),
      (True, False, False, False, 75.2, 6e-2),
      (True, True, False, False, 75.6, 6e-2),
      (True, True, True, False, 76.0, 6e-2),
      (True, True, False, True, 75.8, 5e-2),
      (True, True, True, True, 76.2, 4e-2)]
  assert components.TEACHER_PUBLISHED == pairs.get(components.PAIR).published['teacher']
  expected_switches = {
      'baseline': (False, False, 'none', 'mse'), 'rm': (True, False, 'none', 'mse'),
      'rm_rlf': (True, True, 'sum', 'mse'), 'rm_rlf_abf': (True, True, 'abf', 'mse'),
      'rm_rlf_hcl': (True, True, 'sum', 'hcl'), 'all': (True, True, 'abf', 'hcl')}
  for name, switches in expected_switches.items():
    config = components.get_config(f'row={name}')
    check_config(config)
    assert (config.model, config.teacher) == ('wrn_16_2', 'wrn_40_2')
    assert (config.reviewkd_review, config.reviewkd_residual, config.reviewkd_fusion,
            config.reviewkd_distance) == switches
    assert config.reviewkd_weight == 5.0 and rows[name]
  # Everything on is exactly the pair's config file.
  assert components.get_config('row=all').to_dict() == (
      pairs.reviewkd_config(components.PAIR).to_dict())
  with pytest.raises(ValueError, match="unknown row 'abf'.*ROW one of baseline, rm, rm_rlf, "
                                       'rm_rlf_abf, rm_rlf_hcl, all'):
    components.get_config('row=abf')


def test_every_table_cell_has_its_command_in_the_docs():
  """docs/ablations.md: each cell's command on a table line with its published number."""
  lines = (ROOT / 'docs' / 'ablations.md').read_text().splitlines()

  def line_with(command):
    found = [l for l in lines if f'`{command}`' in l and l.startswith('|')]
    assert len(found) == 1, f'{command} is not on exactly one table line of docs/ablations.md'
    return found[0]

  def numbers(line):
    return {float(x) for x in re.findall(r'\b\d+\.\d+\b', line)}

  for (i, j), top1 in stages.PUBLISHED.items():
    line = line_with(f'configs/cifar100_ablation_stages.py:student_stage={i},teacher_stage={j}')
    assert top1 in numbers(line), line
  for row in components.ROWS:
    line = line_with(f'configs/cifar100_ablation_components.py:row={row.name}')
    assert row.published in numbers(line), line
