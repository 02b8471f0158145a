"""The detectors' distillation terms (`reviewkd_jax.detection.distill`) against PyTorch / numpy
transcriptions of their sources: the ReviewKD authors' detection `kd_trans` + `hcl`
(`testing.torch_reviewkd.DetectionReviewKD`), KD on RoI logits (mdistiller's `kd_loss`),
FitNet's `ConvReg` + MSE, FGFI's imitation mask and loss (twangnh/Distilling-Object-Detectors,
per FPN level). Also: gradients reach the student and the trainable adapters, never the
teacher; everything jits with static shapes and padded ground truth."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import convert
from reviewkd_jax import losses
from reviewkd_jax.detection import anchors as anchor_ops
from reviewkd_jax.detection import distill
from reviewkd_jax.detection import roi_heads
from reviewkd_jax.testing import torch_reviewkd as torch_ref
from tests import torch_utils
from tests.torch_utils import torch

F = torch.nn.functional
SIZES = ((32, 40), (16, 20), (8, 10), (4, 5), (2, 3))   # FPN-like P2..P6 of a 128x160 image
IMAGE = (128, 160)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _pyramid(seed, channels, batch=2, scale=1.0, offset=0.0):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((batch, h, w, channels)) * scale + offset).astype(np.float32)
          for h, w in SIZES]


# ------------------------------------------------------------------------ adaptive pool


@pytest.mark.parametrize('hw', [(25, 34), (13, 17), (7, 9), (4, 5), (2, 3), (99, 167)])
def test_adaptive_avg_pool_matches_torch_on_non_divisible_sizes(hw):
  x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
  for size in (4, 2, 1, (3, 5)):
    ours = np.asarray(losses.adaptive_avg_pool(jnp.asarray(x), size))
    ref = torch_utils.nchw_to_nhwc(F.adaptive_avg_pool2d(_nchw(x), size))
    assert torch_utils.max_abs_diff(ours, ref) < 1e-6


# ----------------------------------------------------------------------------- ReviewKD

C = 32   # channels of the parity test (the real module: 256, checked by name below)


@pytest.fixture(scope='module')
def review_pair():
  t_model = torch_ref.DetectionReviewKD((C,) * 5, (C,) * 5, C)
  student = _pyramid(0, C)
  torch_utils.randomize(t_model, 0, calibrate=None)
  module = distill.FPNReview(mid_channels=C, out_channels=C)
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), student, train=False))
  variables = convert.torch_to_flax(t_model.state_dict(), template)
  return t_model, module, variables


@pytest.mark.parametrize('train', [True, False])
def test_fpn_review_and_hcl_match_authors_kd_trans(review_pair, train):
  t_model, module, variables = review_pair
  variables = convert.torch_to_flax(t_model.state_dict(), variables)  # stats moved by training
  student, teacher = _pyramid(1, C), _pyramid(2, C, scale=2.0, offset=0.3)
  t_model.train(train)
  with torch.no_grad():
    ref_out = t_model([_nchw(x) for x in student])
    ref_loss = float(torch_ref.hcl(ref_out, [_nchw(t) for t in teacher]))
  if train:
    out, new_state = module.apply(variables, student, train=True, mutable=['batch_stats'])
  else:
    out = module.apply(variables, student, train=False)
  for o, r, x in zip(out, ref_out, student):
    assert o.shape == x.shape
    scale = float(np.abs(torch_utils.nchw_to_nhwc(r)).max())
    assert torch_utils.max_abs_diff(o, torch_utils.nchw_to_nhwc(r)) < 1e-5 * max(scale, 1.0)
  loss = float(distill.reviewkd_loss(out, teacher))
  assert abs(loss - ref_loss) < 1e-5 * ref_loss
  assert float(distill.reviewkd_loss(out, teacher, weight=1.2)) == pytest.approx(1.2 * loss)
  if train:  # running statistics updated as nn.BatchNorm2d's (momentum 0.1, unbiased var)
    ref_stats = convert.torch_to_flax(t_model.state_dict(), variables)['batch_stats']
    worst = max(torch_utils.max_abs_diff(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(new_state['batch_stats']), jax.tree_util.tree_leaves(ref_stats)))
    assert worst < 1e-5


def test_fpn_review_names_convert_the_authors_state_dict():
  """The authors' `kd_trans` keys (256 channels: abfs.0 deepest, no att_conv) fit by the rule."""
  t_model = torch_ref.DetectionReviewKD()
  sd = {f'kd_trans.{k}': v for k, v in t_model.state_dict().items()}
  assert 'kd_trans.abfs.0.conv1.0.weight' in sd and 'kd_trans.abfs.0.att_conv.0.weight' not in sd
  module = distill.FPNReview()
  levels = [jnp.zeros((1, h, w, 256)) for h, w in SIZES]
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), levels, train=False))
  variables = convert.torch_to_flax(sd, template, rename=lambda k: k[len('kd_trans.'):])
  assert 'att_conv_0' not in variables['params']['abfs_0']
  assert 'att_conv_0' in variables['params']['abfs_4']


def test_reviewkd_gradients_reach_student_and_abfs_never_teacher(review_pair):
  _, module, variables = review_pair
  student, teacher = _pyramid(3, C), _pyramid(4, C)

  def loss_fn(params, s, t):
    out, _ = module.apply({**variables, 'params': params}, s, train=True,
                          mutable=['batch_stats'])
    return distill.reviewkd_loss(out, t, weight=1.2)

  g_p, g_s, g_t = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(
      variables['params'], student, teacher)
  for path, g in jax.tree_util.tree_leaves_with_path(g_p):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  assert all(float(jnp.abs(g).max()) > 0 for g in g_s)
  assert all(float(jnp.abs(g).max()) == 0 for g in g_t)


# ----------------------------------------------------------------------------------- KD


def _torch_kd(s, t, temperature):
  """mdistiller's `kd_loss` on the valid RoIs concatenated over the batch."""
  log_p_s = F.log_softmax(s / temperature, dim=1)
  p_t = F.softmax(t / temperature, dim=1)
  return F.kl_div(log_p_s, p_t, reduction='none').sum(1).mean() * temperature**2


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_roi_kd_loss_matches_reference(temperature):
  rng = np.random.default_rng(0)
  s = (rng.standard_normal((2, 16, 6)) * 3).astype(np.float32)
  t = (rng.standard_normal((2, 16, 6)) * 3).astype(np.float32)
  valid = np.zeros((2, 16), bool)
  valid[0, :11], valid[1, :5] = True, True
  s[~valid], t[~valid] = np.nan, np.inf   # padding must not leak
  ref = float(_torch_kd(torch.from_numpy(s[valid]), torch.from_numpy(t[valid]), temperature))
  ours = float(distill.roi_kd_loss(s, t, valid, temperature=temperature, weight=1.0))
  assert abs(ours - ref) < 1e-6 * max(ref, 1.0)
  assert float(distill.roi_kd_loss(s, t, valid, temperature=temperature)) == pytest.approx(
      distill.KD_WEIGHT * ours, rel=1e-6)
  assert float(distill.roi_kd_loss(s, t, np.zeros_like(valid))) == 0.0
  g_s, g_t = jax.grad(lambda a, b: distill.roi_kd_loss(a, b, valid), argnums=(0, 1))(
      jnp.nan_to_num(s), jnp.nan_to_num(t, posinf=0.0))
  assert float(jnp.abs(g_s[valid]).max()) > 0 and float(jnp.abs(g_s[~valid]).max()) == 0
  assert float(jnp.abs(g_t).max()) == 0


class _Heads(nn.Module):
  """The parts of `RCNN` that `roi_predictions` touches: `config`, `box_head`, `box_predictor`."""
  config: object

  def setup(self):
    self.box_head = roi_heads.BoxHead(hidden=32)
    self.box_predictor = roi_heads.BoxPredictor(self.config.num_classes)


def test_teacher_roi_logits_run_the_teachers_heads_on_given_rois():
  from reviewkd_jax.detection import model  # pylint: disable=g-import-not-at-top
  config = model.DetectorConfig(backbone='resnet18', num_classes=3, fpn_channels=8,
                                box_head_dim=32)
  rng = np.random.default_rng(0)
  feats = {f'p{i}': jnp.asarray(rng.standard_normal((2, h, w, 8)), jnp.float32)
           for i, (h, w) in zip(range(2, 7), SIZES)}
  xy = rng.uniform(0, 100, (2, 12, 2))
  rois = jnp.asarray(np.concatenate([xy, xy + rng.uniform(8, 60, (2, 12, 2))], -1), jnp.float32)
  pooled = roi_heads.pool(config.roi, distill.pyramid(feats, distill.BOX_LEVELS), rois, 7)
  head, pred = roi_heads.BoxHead(hidden=32), roi_heads.BoxPredictor(3)
  hv = head.init(jax.random.key(1), pooled)
  pv = pred.init(jax.random.key(2), head.apply(hv, pooled))
  variables = {'params': {'box_head': hv['params'], 'box_predictor': pv['params']}}
  expected = pred.apply(pv, head.apply(hv, pooled))[0]

  for module in (_Heads(config), model.RCNN(config)):
    got = jax.jit(lambda v, f, r, m=module: distill.teacher_roi_logits(m, v, f, r))(
        variables, feats, rois)
    assert got.shape == (2, 12, 4)
    assert torch_utils.max_abs_diff(got, expected) < 1e-5

  def kd(v, f):
    return distill.roi_kd_loss(jnp.zeros((2, 12, 4)),
                               distill.teacher_roi_logits(model.RCNN(config), v, f, rois),
                               jnp.ones((2, 12), bool))
  g_v, g_f = jax.jit(jax.grad(kd, argnums=(0, 1)))(variables, feats)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves((g_v, g_f)))
  logits, deltas = distill.roi_predictions(model.RCNN(config), variables, feats, rois)
  assert torch_utils.max_abs_diff(logits, expected) < 1e-5 and deltas.shape == (2, 12, 12)


# ------------------------------------------------------------------------------- FitNet


def test_fitnet_adapter_and_loss_match_convreg_and_mse():
  rng = np.random.default_rng(0)
  s = rng.standard_normal((2, 16, 20, 16)).astype(np.float32)     # e.g. R18 res3 (scaled down)
  t = np.abs(rng.standard_normal((2, 16, 20, 24))).astype(np.float32)
  ref = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 1), torch.nn.BatchNorm2d(24),
                            torch.nn.ReLU())
  torch_utils.randomize(ref, 0)
  ref.train()
  adapter = distill.FitNetAdapter(24)
  template = jax.eval_shape(lambda: adapter.init(jax.random.key(0), s, train=False))
  rename = {'0': 'conv', '1': 'bn'}
  variables = convert.torch_to_flax(
      ref.state_dict(), template, rename=lambda k: rename[k.split('.')[0]] + k[1:])
  with torch.no_grad():
    r = ref(_nchw(s))
    ref_loss = float(F.mse_loss(r, _nchw(t)))
  out, state = adapter.apply(variables, s, train=True, mutable=['batch_stats'])
  assert torch_utils.max_abs_diff(out, torch_utils.nchw_to_nhwc(r)) < 1e-5
  ours = float(distill.fitnet_loss(out, t, weight=1.0))
  assert abs(ours - ref_loss) < 1e-6 * ref_loss
  assert float(distill.fitnet_loss(out, t)) == pytest.approx(0.1 * ours, rel=1e-6)
  assert torch_utils.max_abs_diff(state['batch_stats']['bn']['var'],
                                  ref[1].running_var.numpy()) < 1e-5

  def loss_fn(p, x, y):
    a, _ = adapter.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])
    return distill.fitnet_loss(a, y)

  g_p, g_s, g_t = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(variables['params'], s, t)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves((g_p, g_s)))
  assert float(jnp.abs(g_t).max()) == 0
  with pytest.raises(ValueError, match='differ'):
    distill.fitnet_loss(out, t[..., :8])


# --------------------------------------------------------------------------------- FGFI


def _np_iou(a, b):
  """IoU without "+1" (our convention), (N, 4) x (M, 4)."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _np_fgfi_masks(anchors, shapes, gt_boxes, num_gt, per_level=True, psi=0.5):
  """The FGFI authors' `anchor_target_layer` mask, level by level: loop over the boxes,
  stop at the first padding box, threshold psi * max IoU, count anchors over IoU, > 0."""
  out = []
  ious_all = [[_np_iou(a, g[:n]) for a in anchors] for g, n in zip(gt_boxes, num_gt)]
  for level, (h, w) in enumerate(shapes):
    masks = []
    for i in range(len(gt_boxes)):
      iou_map = ious_all[i][level].reshape(h, w, -1, num_gt[i])
      if per_level:
        max_iou = iou_map.reshape(-1, num_gt[i]).max(0)
      else:
        max_iou = np.max([x.max(0) for x in ious_all[i]], axis=0)
      mask = np.zeros((h, w), np.int64)
      for k in range(num_gt[i]):
        mask += np.sum(iou_map[:, :, :, k] > max_iou[k] * psi, axis=2)
      masks.append(mask > 0)
    out.append(np.stack(masks))
  return out


def _gt():
  boxes = np.zeros((2, 6, 4), np.float32)
  boxes[0, :3] = [[10, 12, 50, 70], [60, 20, 150, 120], [100, 90, 108, 100]]
  boxes[1, :1] = [[0, 0, 127, 159]]
  boxes[1, 1:] = [[5, 5, 40, 40]]   # padding slots with real-looking boxes: gt_valid masks them
  valid = np.zeros((2, 6), bool)
  valid[0, :3], valid[1, :1] = True, True
  return boxes, valid, [3, 1]


@pytest.mark.parametrize('per_level', [True, False])
def test_imitation_masks_match_the_fgfi_rule(per_level):
  config = anchor_ops.AnchorConfig()
  boxes, valid, num_gt = _gt()
  fn = jax.jit(lambda b, v: distill.imitation_masks(config, SIZES, b, v, per_level=per_level))
  ours = fn(boxes, valid)
  ref = _np_fgfi_masks(anchor_ops.grid_anchors(config, SIZES), SIZES, boxes, num_gt,
                       per_level=per_level)
  assert len(ours) == 5
  for o, r, (h, w) in zip(ours, ref, SIZES):
    assert o.shape == (2, h, w) and o.dtype == bool
    np.testing.assert_array_equal(np.asarray(o), r)
  assert int(ours[0][0].sum()) > 0
  if per_level:   # every level holds each valid box's best anchors
    assert all(int(o[i].sum()) > 0 for o in ours for i in range(2))
  none = fn(boxes, np.zeros_like(valid))
  assert not any(bool(o.any()) for o in none)


def _torch_fgfi_loss(adapted, teacher, mask):
  """twangnh's `trainval_net_sup.py`: sum((t - a)^2 * mask) / (2 * mask.sum())."""
  m = mask.float().unsqueeze(1)
  return (torch.pow(teacher - adapted, 2) * m).sum() / (m.sum() * 2)


def test_fgfi_adapters_and_loss_match_reference():
  boxes, valid, _ = _gt()
  masks = distill.imitation_masks(anchor_ops.AnchorConfig(), SIZES, boxes, valid)
  student, teacher = _pyramid(5, 8), _pyramid(6, 8, offset=0.5)
  adapters = distill.FGFIAdapters(out_channels=8)
  variables = adapters.init(jax.random.key(0), student)
  assert set(variables['params']) == set(distill.LEVELS)
  k = variables['params']['p2']['kernel']
  assert k.shape == (3, 3, 8, 8) and float(jnp.abs(k).max()) <= 2e-4
  # The reference conv with the same (re-drawn, larger) weights.
  rng = np.random.default_rng(7)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.2, jnp.float32),
      variables['params'])
  adapted = adapters.apply({'params': params}, student)
  ref = 0.0
  for name, s, t, m, a in zip(distill.LEVELS, student, teacher, masks, adapted):
    w = torch.from_numpy(np.asarray(params[name]['kernel']).transpose(3, 2, 0, 1).copy())
    b = torch.from_numpy(np.array(params[name]['bias']))
    ra = F.conv2d(_nchw(s), w, b, padding=1)
    assert torch_utils.max_abs_diff(a, torch_utils.nchw_to_nhwc(ra)) < 1e-5
    if bool(np.asarray(m).any()):
      ref += float(_torch_fgfi_loss(ra, _nchw(t), torch.from_numpy(np.array(m))))
  ours = float(distill.fgfi_loss(adapted, teacher, masks, weight=1.0))
  assert abs(ours - ref) < 1e-5 * ref
  assert float(distill.fgfi_loss(adapted, teacher, masks)) == pytest.approx(0.01 * ours, rel=1e-6)
  empty = [jnp.zeros_like(m) for m in masks]
  assert float(distill.fgfi_loss(adapted, teacher, empty)) == 0.0

  def loss_fn(p, s, t):
    return distill.fgfi_loss(adapters.apply({'params': p}, s), t, masks)

  g_p, g_s, g_t = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(params, student, teacher)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves((g_p, g_s)))
  assert all(float(jnp.abs(g).max()) == 0 for g in g_t)
  # No gradient farther than the 3x3 adapter's reach from an imitated location.
  m = np.pad(np.asarray(masks[0]), ((0, 0), (1, 1), (1, 1)))
  near = np.zeros_like(m)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      near |= np.roll(np.roll(m, dy, 1), dx, 2)
  far = ~near[:, 1:-1, 1:-1]
  assert far.any() and float(jnp.abs(g_s[0][far]).max()) == 0


# ------------------------------------------------------------------------ jit, together


def test_all_terms_jit_together_with_static_shapes():
  """One jitted function computes the four terms from padded inputs; retracing only on shape."""
  boxes, valid, _ = _gt()
  student, teacher = _pyramid(8, 16), _pyramid(9, 16)
  review = distill.FPNReview(mid_channels=16, out_channels=16)
  fit = distill.FitNetAdapter(16)
  fgfi = distill.FGFIAdapters(out_channels=16)
  rv = review.init(jax.random.key(0), student, train=False)
  fv = fit.init(jax.random.key(1), student[1], train=False)
  gv = fgfi.init(jax.random.key(2), student)
  traces = []

  @jax.jit
  def step(s, t, b, v, logits_s, logits_t, roi_valid):
    traces.append(1)
    out, _ = review.apply(rv, s, train=True, mutable=['batch_stats'])
    a, _ = fit.apply(fv, s[1], train=True, mutable=['batch_stats'])
    masks = distill.imitation_masks(anchor_ops.AnchorConfig(), [x.shape[1:3] for x in s], b, v)
    return (distill.reviewkd_loss(out, t) + distill.fitnet_loss(a, t[1]) +
            distill.fgfi_loss(fgfi.apply(gv, s), t, masks) +
            distill.roi_kd_loss(logits_s, logits_t, roi_valid))

  rng = np.random.default_rng(0)
  ls, lt = (rng.standard_normal((2, 8, 4)).astype(np.float32) for _ in range(2))
  rvalid = np.ones((2, 8), bool)
  first = step(student, teacher, boxes, valid, ls, lt, rvalid)
  valid2 = valid.copy()
  valid2[0, 2] = False
  second = step(student, teacher, boxes, valid2, ls, lt, rvalid)
  assert np.isfinite(float(first)) and np.isfinite(float(second))
  assert len(traces) == 1
