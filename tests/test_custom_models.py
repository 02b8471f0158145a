"""ReviewKD on Flax networks defined here (distill.custom): a small CNN pair, a tiny ViT
student distilled from a CNN teacher, the token-to-map rule, and one clear error per
mistake; the README's "Your own model and data" example runs as written."""
import pathlib
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reviewkd_jax.distill import custom
from reviewkd_jax.distill import reviewkd
from reviewkd_jax.models import imported

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


class Stage(nn.Module):
  """conv3x3 + BatchNorm + ReLU: its output is the stage's feature."""
  width: int
  stride: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.width, (3, 3), strides=self.stride, use_bias=False, name='conv')(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))


class ConvNet(nn.Module):
  """A small CNN: stages `stage1`, `stage2`, ... (stride 1 then 2), pooled embedding sown."""
  widths: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.widths):
      x = Stage(width, 1 if i == 0 else 2, name=f'stage{i + 1}')(x, train)
    h = x.mean(axis=(1, 2))
    self.sow('intermediates', 'embedding', h)
    return nn.Dense(self.num_classes, name='head')(h)


class Block(nn.Module):
  """A pre-norm transformer block on (N, tokens, dim)."""
  dim: int
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name='attn')(
        nn.LayerNorm(name='norm1')(x))
    x = x + y
    y = nn.Dense(self.dim, name='fc2')(nn.gelu(nn.Dense(2 * self.dim, name='fc1')(
        nn.LayerNorm(name='norm2')(x))))
    return x + y


class TinyViT(nn.Module):
  """Patches of 4 px, a class token, `depth` blocks `block0`...; the class token's final
  embedding is sown as `cls_embedding`."""
  dim: int = 32
  depth: int = 2
  extra_tokens: int = 1
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (4, 4), strides=4, name='patch_embed')(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param('cls', nn.initializers.normal(0.02), (1, self.extra_tokens, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, self.extra_tokens, c)), x], axis=1)
    x = x + self.param('pos', nn.initializers.normal(0.02), (1, x.shape[1], c))
    for i in range(self.depth):
      x = Block(self.dim, name=f'block{i}')(x)
    x = nn.LayerNorm(name='norm')(x)
    self.sow('intermediates', 'cls_embedding', x[:, 0])
    return nn.Dense(self.num_classes, name='head')(x[:, 0])


def _images(n=4, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _variables(init, seed=0):
  """Returns variables shaped as `init()` returns them, drawn on the host (nothing compiled):
  BatchNorm/LayerNorm scales and running variances 1, biases and means 0, other weights
  N(0, 1 / fan_in)."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('scale', 'var'):
      return jnp.ones(shape.shape, shape.dtype)
    if name in ('bias', 'mean'):
      return jnp.zeros(shape.shape, shape.dtype)
    fan_in = int(np.prod(shape.shape[:-1])) or 1
    return jnp.asarray(rng.normal(0, fan_in ** -0.5, shape.shape), shape.dtype)

  return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(init))


def test_cnn_pair_levels_head_and_gradients():
  student, teacher = ConvNet((4, 8, 8)), ConvNet((8, 16, 32))
  x = _images()
  review = custom.ReviewKD(
      student, teacher, student_outputs=['stage1', 'stage2', 'stage3', 'embedding'],
      teacher_outputs=['stage1', 'stage2', 'stage3', 'embedding'], example_input=x,
      student_kwargs={'train': False}, teacher_kwargs={'train': False})
  assert [l.map_shape for l in review.student_levels] == [
      (4, 16, 16, 4), (4, 8, 8, 8), (4, 4, 4, 8), (4, 1, 1, 8)]
  assert [l.map_shape for l in review.teacher_levels] == [
      (4, 16, 16, 8), (4, 8, 8, 16), (4, 4, 4, 32), (4, 1, 1, 32)]
  assert review.student_levels[-1].sown and not review.student_levels[0].sown
  assert "student 'stage2' (4, 8, 8, 8)" in review.summary()
  s_vars = _variables(lambda: student.init(jax.random.key(0), x), 0)
  t_vars = _variables(lambda: teacher.init(jax.random.key(0), x), 1)
  head_vars = review.init(jax.random.key(2))
  assert set(head_vars['params']) == {'abfs_0', 'abfs_1', 'abfs_2', 'abfs_3'}
  # Width: min(512, channels of the deepest student level) = 8.
  assert head_vars['params']['abfs_0']['conv1_0']['kernel'].shape == (1, 1, 8, 8)

  @jax.jit
  def grads(s_params, abf_params, t_vars):
    def loss_fn(s_params, abf_params, t_vars):
      (logits, s_levels), s_state = review.apply_student(
          {'params': s_params, 'batch_stats': s_vars['batch_stats']}, x, train=True,
          mutable=['batch_stats'])
      _, t_levels = review.apply_teacher(t_vars, x, train=False)
      loss, head_state = review.loss({**head_vars, 'params': abf_params}, s_levels, t_levels,
                                     train=True)
      return loss, (logits, [l.shape for l in s_levels], s_state, head_state)

    return jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        s_params, abf_params, t_vars)

  (loss, (logits, shapes, s_state, head_state)), (g_s, g_abf, g_t) = grads(
      s_vars['params'], head_vars['params'], t_vars)
  assert logits.shape == (4, 10) and np.isfinite(float(loss)) and float(loss) > 0
  assert shapes == [l.map_shape for l in review.student_levels]
  assert set(s_state) == {'batch_stats'} and set(head_state) == {'batch_stats'}
  norm = lambda tree: sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(tree))
  assert norm(g_s['stage1']) > 0 and norm(g_abf['abfs_3']) > 0  # shallowest level learns
  assert norm(g_t) == 0  # the teacher is frozen


def test_head_is_reviewkd_students_abf_chain():
  """ReviewHead on given levels == ReviewKDStudent's head on the same levels and params."""

  class Levels(nn.Module):  # a backbone whose features are fixed functions of the input
    @nn.compact
    def __call__(self, x, train):
      del train
      s1 = jnp.tile(x, (1, 1, 1, 2))
      s2 = nn.avg_pool(x, (2, 2), (2, 2))
      return x.mean((1, 2)), {'stages': [s1, s2], 'pooled': s2.mean((1, 2))}

  x = _images(4, 8)
  channels, sizes = (5, 7, 9), ((8, 8), (6, 6), (1, 1))
  wrapped = reviewkd.ReviewKDStudent(Levels(), channels, sizes)
  head = custom.ReviewHead(channels, sizes)
  levels = [jnp.tile(x, (1, 1, 1, 2)), nn.avg_pool(x, (2, 2), (2, 2))]
  levels.append(levels[1].mean((1, 2))[:, None, None, :])

  variables = _variables(lambda: wrapped.init(jax.random.key(0), x, train=False))

  @jax.jit
  def both(variables):
    out, state = wrapped.apply(variables, x, train=True, mutable=['batch_stats'])
    own = {c: {k: v for k, v in t.items() if k.startswith('abfs_')}
           for c, t in variables.items()}
    fused, head_state = head.apply(own, levels, train=True, mutable=['batch_stats'])
    return out.adapter, fused, state, head_state

  expected, got, state, head_state = both(variables)
  assert [g.shape for g in got] == [(4, 8, 8, 5), (4, 6, 6, 7), (4, 1, 1, 9)]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
  for e, g in zip(expected, got):  # one program, fused differently: float rounding only
    close(e, g)
  jax.tree.map(close, state['batch_stats']['abfs_1'], head_state['batch_stats']['abfs_1'])


def test_tokens_become_maps_row_major_without_the_class_token():
  tokens = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
  got = imported.to_map(tokens, name='t', owner='The student')
  np.testing.assert_array_equal(got, tokens[:, 1:].reshape(2, 4, 4, 3))
  got = imported.to_map(tokens[:, 1:], name='t', owner='The student')  # no class token
  np.testing.assert_array_equal(got, tokens[:, 1:].reshape(2, 4, 4, 3))
  assert imported.map_shape((2, 5), name='v', owner='x') == (2, 1, 1, 5)
  assert imported.map_shape((2, 7, 5, 3), name='m', owner='x') == (2, 7, 5, 3)


def test_vit_student_distilled_from_cnn_teacher_loss_falls():
  student, teacher = TinyViT(), ConvNet((8, 16, 32))
  x = _images(8)
  review = custom.ReviewKD(
      student, teacher, student_outputs=['block0', 'block1', 'cls_embedding'],
      teacher_outputs=['stage2', 'stage3', 'embedding'], example_input=x)
  # 16 px / patch 4 = 4x4 patch tokens + the class token: 17 tokens -> (4, 4) maps.
  assert [l.shape for l in review.student_levels] == [(8, 17, 32), (8, 17, 32), (8, 32)]
  assert [l.map_shape for l in review.student_levels] == [
      (8, 4, 4, 32), (8, 4, 4, 32), (8, 1, 1, 32)]
  assert [l.map_shape for l in review.teacher_levels] == [
      (8, 8, 8, 16), (8, 4, 4, 32), (8, 1, 1, 32)]
  s_vars = _variables(lambda: student.init(jax.random.key(0), x), 0)
  t_vars = _variables(lambda: teacher.init(jax.random.key(0), x), 1)
  head_vars = review.init(jax.random.key(2))
  params = {'student': s_vars['params'], 'abfs': head_vars['params']}
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, head_state, opt_state):
    def loss_fn(params):
      _, s_levels = review.apply_student({'params': params['student']}, x)
      _, t_levels = review.apply_teacher(t_vars, x, train=False)
      return review.loss({'params': params['abfs'], **head_state}, s_levels, t_levels,
                         train=True)

    (loss, head_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), head_state, opt_state, loss

  head_state = {'batch_stats': head_vars['batch_stats']}
  opt_state = tx.init(params)
  history = []
  for _ in range(8):
    params, head_state, opt_state, loss = step(params, head_state, opt_state)
    history.append(float(loss))
  assert all(np.isfinite(history))
  assert all(b < a for a, b in zip(history, history[1:])), history
  assert history[-1] < 0.8 * history[0], history  # measured: 2.76 -> 1.90


@pytest.mark.parametrize('student_outputs, teacher_outputs, expected', [
    (['stage1', 'stag2'], ['stage1', 'stage2'],
     ["The student has no output 'stag2'", 'stage1: (2, 16, 16, 4)', 'stage2/bn: (2, 8, 8, 8)',
      'embedding: (2, 8)']),
    (['stage1', 'stage2'], ['stage2'],
     ['The teacher has fewer levels than the student', "'stage2' (2, 8, 8, 8)",
      "'stage2' (2, 8, 8, 16)"]),
    (['stage1', 'head'], ['stage1', 'stage2'], None),  # (N, C) logits: a 1x1 level, fine
])
def test_cnn_naming_mistakes(student_outputs, teacher_outputs, expected):
  x = _images(2)
  make = lambda: custom.ReviewKD(ConvNet((4, 8)), ConvNet((8, 16)),
                                 student_outputs=student_outputs,
                                 teacher_outputs=teacher_outputs, example_input=x)
  if expected is None:
    assert make().student_levels[1].map_shape == (2, 1, 1, 10)
    return
  with pytest.raises(custom.FeatureOutputError) as e:
    make()
  for text in expected:
    assert text in str(e.value)


class Odd(nn.Module):
  """Outputs that cannot be ReviewKD levels."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(3, name='shared')
    y = shared(shared(x))  # called twice
    z = SwappedConv(name='conv')(x)
    flat = Flatten5(name='five')(x)
    pair = Pair(name='pair')(x)
    return y.mean() + z.mean() + flat.mean() + pair[0].mean()


class SwappedConv(nn.Module):
  """A 1x1 conv whose output has the batch second: (H, N, W, C)."""

  @nn.compact
  def __call__(self, x):
    return jnp.swapaxes(nn.Conv(4, (1, 1), name='conv')(x), 0, 1)


class Flatten5(nn.Module):
  def __call__(self, x):
    return x[..., None]


class Pair(nn.Module):
  def __call__(self, x):
    return x, x


@pytest.mark.parametrize('name, expected', [
    ('shared', ["output 'shared' is produced 2 times"]),
    ('five', ["output 'five' has shape (2, 8, 8, 3, 1)", '(N, H, W, C) maps']),
    ('pair', ["output 'pair' is a tuple, not an array"]),
])
def test_outputs_that_are_not_levels(name, expected):
  with pytest.raises(custom.FeatureOutputError) as e:
    custom.ReviewKD(Odd(), ConvNet((4,)), student_outputs=[name], teacher_outputs=['stage1'],
                    example_input=_images(2, 8))
  for text in expected:
    assert text in str(e.value)


def test_token_counts_that_are_no_grid_and_axes_that_are_no_batch():
  x = _images(2)
  # Two extra tokens: 18 tokens are neither a square nor a class token plus a square.
  with pytest.raises(custom.FeatureOutputError, match=r"'block0' has shape \(2, 18, 32\): 18 "
                     'tokens are neither a square grid'):
    custom.ReviewKD(TinyViT(extra_tokens=2), ConvNet((8,)), student_outputs=['block0'],
                    teacher_outputs=['stage1'], example_input=x)
  with pytest.raises(custom.FeatureOutputError, match=r"'conv' has shape \(8, 2, 8, 4\), whose "
                     r'first axis is not the batch \(2\)'):
    custom.ReviewKD(Odd(), ConvNet((4,)), student_outputs=['conv'], teacher_outputs=['stage1'],
                    example_input=_images(2, 8))
  with pytest.raises(ValueError, match='list of output names'):
    custom.ReviewKD(ConvNet((4,)), ConvNet((4,)), student_outputs='stage1',
                    teacher_outputs=['stage1'], example_input=x)


def test_levels_of_another_network_are_refused_by_the_head():
  x = _images(2)
  review = custom.ReviewKD(ConvNet((4, 8)), ConvNet((8, 16)),
                           student_outputs=['stage1', 'stage2'],
                           teacher_outputs=['stage1', 'stage2'], example_input=x)
  with pytest.raises(custom.FeatureOutputError, match=r"sized for the student levels 'stage1' "
                     r'\(N, 16, 16, 4\), .*got 1 levels shaped \(2, 16, 16, 4\)'):
    review.loss({}, [jnp.zeros((2, 16, 16, 4))], [], train=False)


def _readme_section(title):
  text = README.read_text()
  start = text.index(f'## {title}')
  nxt = text.find('\n## ', start + 1)
  return text[start:nxt if nxt > 0 else None]


def test_readme_example_runs(capsys):
  code = re.search(r'```python\n(.*?)```', _readme_section('Your own model and data'),
                   re.S).group(1)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  history = scope['history']
  assert len(history) >= 3 and all(np.isfinite(history))
  assert history[-1] < history[0]
  assert 'level 0' in capsys.readouterr().out
