"""Anchors and the RPN: parity with torchvision's RegionProposalNetwork, Detectron2's formulas.

The reference is torchvision's `fasterrcnn_resnet50_fpn` (random weights, `testing.torch_detection`)
on two 128x160 images; its FPN features feed both RPNs. Its head's weights are redrawn at a
larger scale than the N(0, 0.01) init, with non-zero biases, so that deltas move the anchors by
a fraction of their size and the logits spread over a few units (with the init they are ~0.01
and every proposal is its anchor). The second image is declared 100x136 inside the 128x160
batch, so clipping to each image's true size is exercised.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import convert
from reviewkd_jax.detection import anchors as anchor_lib
from reviewkd_jax.detection import rpn as rpn_lib
from tests.torch_utils import torch

IMAGE = (128, 160)
SIZES = [(128, 160), (100, 136)]
GT = [[[10., 20., 60., 90.], [70., 8., 150., 50.], [30., 60., 140., 120.]],
      [[5., 5., 40., 30.], [50., 40., 130., 98.]]]


def _tv_rpn_flat(obj, deltas):
  """torchvision's own flattening of its head outputs: per level (N, HWA), (N, HWA, 4)."""
  # pylint: disable-next=g-import-not-at-top
  from torchvision.models.detection.rpn import permute_and_flatten
  out_o, out_d = [], []
  for o, d in zip(obj, deltas):
    n, a, h, w = o.shape
    out_o.append(permute_and_flatten(o, n, a, 1, h, w).reshape(n, -1).numpy())
    out_d.append(permute_and_flatten(d, n, a, 4, h, w).numpy())
  return out_o, out_d


class _Recorder:
  """Wraps torchvision's fg_bg_sampler: records its input labels and sampled masks."""

  def __init__(self, sampler):
    self.sampler, self.calls = sampler, []

  def __call__(self, labels):
    pos, neg = self.sampler(labels)
    self.calls.append(([l.clone() for l in labels], pos, neg))
    return pos, neg


@pytest.fixture(scope='module')
def tv():
  """torchvision's RPN run on two images in test and train mode, with what it computed."""
  from reviewkd_jax.testing import torch_detection as td  # pylint: disable=g-import-not-at-top
  model = td.build('faster')   # first: importing torchvision itself needs its ops declared
  # pylint: disable-next=g-import-not-at-top
  from torchvision.models.detection.image_list import ImageList
  gen = torch.Generator().manual_seed(0)
  head = model.rpn.head
  with torch.no_grad():
    for conv, std in ((head.conv[0][0], 0.002), (head.cls_logits, 0.02), (head.bbox_pred, 0.01)):
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
      conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
    images = [torch.rand(3, *IMAGE, generator=gen) for _ in range(2)]
    batch, _ = model.transform(images)
    assert tuple(batch.tensors.shape[-2:]) == IMAGE
    features = model.backbone(batch.tensors)
    image_list = ImageList(batch.tensors, SIZES)
    out = {'features': [f.numpy().transpose(0, 2, 3, 1) for f in features.values()]}
    obj, deltas = head(list(features.values()))
    out['objectness'], out['deltas'] = _tv_rpn_flat(obj, deltas)
    out['anchors'] = model.rpn.anchor_generator(image_list, list(features.values()))[0].numpy()
    out['test_boxes'] = [b.numpy() for b in model.rpn(image_list, features)[0]]
    model.rpn.train()
    recorder = _Recorder(model.rpn.fg_bg_sampler)
    model.rpn.fg_bg_sampler = recorder
    torch.manual_seed(0)
    targets = [{'boxes': torch.tensor(g)} for g in GT]
    boxes, losses = model.rpn(image_list, features, targets)
    out['train_boxes'] = [b.numpy() for b in boxes]
    out['losses'] = {k: float(v) for k, v in losses.items()}
    labels, pos, neg = recorder.calls[-1]
    out['labels'] = np.stack([l.numpy() for l in labels])
    out['pos'] = np.stack([p.numpy().astype(bool) for p in pos])
    out['neg'] = np.stack([n.numpy().astype(bool) for n in neg])
    out['state_dict'] = {k: v for k, v in model.state_dict().items() if k.startswith('rpn.head')}
  return out


def _padded_gt():
  boxes = np.zeros((2, 4, 4), np.float32)
  valid = np.zeros((2, 4), bool)
  for i, g in enumerate(GT):
    boxes[i, :len(g)], valid[i, :len(g)] = g, True
  return jnp.asarray(boxes), jnp.asarray(valid)


def _tv_anchors(tv):
  shapes = [f.shape[1:3] for f in tv['features']]
  return anchor_lib.grid_anchors(anchor_lib.AnchorConfig.torchvision(), shapes, IMAGE)


def test_anchors_equal_torchvision(tv):
  shapes = [f.shape[1:3] for f in tv['features']]
  assert anchor_lib.feature_shapes(IMAGE) == [tuple(s) for s in shapes]
  ours = np.concatenate(_tv_anchors(tv))
  np.testing.assert_array_equal(ours, tv['anchors'])


def test_anchors_follow_detectron2_formula():
  config = anchor_lib.AnchorConfig()
  levels = anchor_lib.anchors_for_image(config, IMAGE)
  for stride, size, got in zip((4, 8, 16, 32, 64), (32, 64, 128, 256, 512), levels):
    gh, gw = -(-IMAGE[0] // stride), -(-IMAGE[1] // stride)
    want = []
    for i in range(gh):
      for j in range(gw):
        for r in (0.5, 1.0, 2.0):   # w = sqrt(s^2 / r), h = r w, centred at (j, i) * stride
          w = np.sqrt(size * size / r)
          h = r * w
          cx, cy = j * stride, i * stride
          want.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-4)
  # torchvision differs by rounding, and on P6 of a 160-wide image by its stride 160 // 3 = 53.
  tv_p6 = anchor_lib.anchors_for_image(anchor_lib.AnchorConfig.torchvision(), IMAGE)[-1]
  # Column 2 of P6, the square anchor (half side 256): x1 = 2 * 53 - 256 vs 2 * 64 - 256.
  assert tv_p6[2 * 3 + 1, 0] == 2 * 53 - 256 and levels[-1][2 * 3 + 1, 0] == 2 * 64 - 256


def _converted_head(tv):
  rename = {'rpn.head.conv.0.0': 'conv', 'rpn.head.cls_logits': 'objectness',
            'rpn.head.bbox_pred': 'deltas'}
  head = rpn_lib.RPNHead(num_anchors=3)
  feats = [jnp.asarray(f) for f in tv['features']]
  template = jax.eval_shape(head.init, jax.random.key(0), feats)
  def rename_key(key):
    module, _, leaf = key.rpartition('.')
    return f'{rename[module]}.{leaf}'
  variables = convert.torch_to_flax(tv['state_dict'], template, rename=rename_key)
  return head, variables, feats


def test_head_matches_torchvision(tv):
  head, variables, feats = _converted_head(tv)
  objectness, deltas = jax.jit(head.apply)(variables, feats)
  for ours, ref in zip(objectness + deltas, tv['objectness'] + tv['deltas']):
    assert ours.shape == ref.shape   # outputs up to ~4; measured worst abs diff 4.3e-6
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def _head_outputs(tv, source):
  """(objectness, deltas) per level: torchvision's head's, or ours with its converted weights."""
  if source == 'torchvision_head':
    return [jnp.asarray(o) for o in tv['objectness']], [jnp.asarray(d) for d in tv['deltas']]
  head, variables, feats = _converted_head(tv)
  return jax.jit(head.apply)(variables, feats)


# Proposals from torchvision's head outputs differ by float rounding of the decode only (a few
# ulp, measured <= 4.6e-5 px under jit); from our head's outputs (which differ by <= 4.3e-6)
# by <= 2.5e-4 px.
@pytest.mark.parametrize('training,source,atol', [
    (False, 'torchvision_head', 1e-4), (True, 'torchvision_head', 1e-4),
    (False, 'our_head', 1e-3)])
def test_proposals_match_torchvision(tv, training, source, atol):
  """The same valid proposals as torchvision, in the same order (train: top-k 2000 / 2000)."""
  config = rpn_lib.RPNConfig.torchvision()
  propose = jax.jit(lambda o, d, s: rpn_lib.propose(config, _tv_anchors(tv), o, d, s,
                                                    training=training))
  out = propose(*_head_outputs(tv, source), jnp.asarray(SIZES))
  refs = tv['train_boxes' if training else 'test_boxes']
  assert out.boxes.shape == (2, config.post_nms_topk[0 if training else 1], 4)
  worst = 0.0
  for i, ref in enumerate(refs):
    n = int(out.valid[i].sum())
    assert n == len(ref) and bool(out.valid[i, :n].all())
    np.testing.assert_allclose(np.asarray(out.boxes[i, :n]), ref, rtol=0, atol=atol)
    worst = max(worst, float(np.abs(np.asarray(out.boxes[i, :n]) - ref).max()))
    assert float(out.boxes[i, :n, 2].max()) <= SIZES[i][1]
    assert float(out.boxes[i, :n, 3].max()) <= SIZES[i][0]
  print(f'{len(refs[0])} + {len(refs[1])} proposals, worst abs diff {worst:.2e} px')


@pytest.mark.parametrize('source', ['torchvision_head', 'our_head'])
def test_losses_match_torchvision(tv, source):
  """torchvision's labels, and its losses from its own sampled anchors (rtol 1e-5; measured
  0 from its head's outputs, <= 1.2e-7 relative from ours)."""
  config = rpn_lib.RPNConfig.torchvision()
  anchors = _tv_anchors(tv)
  gt, gt_valid = _padded_gt()
  labels = jax.vmap(lambda g, v: rpn_lib.label_anchors(
      config, jnp.concatenate(anchors), g, v)[0])(gt, gt_valid)
  np.testing.assert_array_equal(np.asarray(labels), tv['labels'])
  assert tv['pos'].sum() > 0
  losses = rpn_lib.rpn_losses(config, anchors, *_head_outputs(tv, source), gt, gt_valid,
                              samples=(tv['pos'], tv['neg']))
  np.testing.assert_allclose(float(losses['loss_rpn_cls']), tv['losses']['loss_objectness'],
                             rtol=1e-5)
  np.testing.assert_allclose(float(losses['loss_rpn_loc']), tv['losses']['loss_rpn_box_reg'],
                             rtol=1e-5)


def test_detectron2_loss_is_its_formula(tv):
  """L1 sum over sampled positives and BCE sum over sampled anchors, both / (256 * images)."""
  config = rpn_lib.RPNConfig()
  anchors = anchor_lib.anchors_for_image(config.anchors, IMAGE)
  gt, gt_valid = _padded_gt()
  objectness = [jnp.asarray(o) for o in tv['objectness']]
  deltas = [jnp.asarray(d) for d in tv['deltas']]
  labels = np.stack([np.asarray(rpn_lib.label_anchors(config, jnp.concatenate(anchors), g, v)[0])
                     for g, v in zip(gt, gt_valid)])
  pos, neg = labels == 1, labels == 0   # every labelled anchor, more than 256: any masks do
  losses = rpn_lib.rpn_losses(config, anchors, objectness, deltas, gt, gt_valid,
                              samples=(pos, neg))
  a = np.concatenate(anchors).astype(np.float64)
  x = np.concatenate([np.asarray(o) for o in objectness], 1).astype(np.float64)
  d = np.concatenate([np.asarray(v) for v in deltas], 1).astype(np.float64)
  cls = loc = 0.0
  for i in range(2):
    g = np.asarray(gt[i])[np.asarray(gt_valid[i])].astype(np.float64)
    lt = np.maximum(g[:, None, :2], a[None, :, :2])
    rb = np.minimum(g[:, None, 2:], a[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter / (area(g)[:, None] + area(a)[None] - inter)
    m = g[iou.argmax(0)]
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    gw, gh = m[:, 2] - m[:, 0], m[:, 3] - m[:, 1]
    t = np.stack([(m[:, 0] + gw / 2 - a[:, 0] - aw / 2) / aw,
                  (m[:, 1] + gh / 2 - a[:, 1] - ah / 2) / ah,
                  np.log(gw / aw), np.log(gh / ah)], -1)
    loc += np.abs(d[i] - t)[pos[i]].sum()
    y = pos[i].astype(np.float64)
    bce = np.log1p(np.exp(-np.abs(x[i]))) + np.maximum(x[i], 0) - x[i] * y
    cls += bce[pos[i] | neg[i]].sum()
  np.testing.assert_allclose(float(losses['loss_rpn_cls']), cls / 512, rtol=1e-5)
  np.testing.assert_allclose(float(losses['loss_rpn_loc']), loc / 512, rtol=1e-5)


def test_sampling_reproducible_from_key(tv):
  config = rpn_lib.RPNConfig()
  anchors = anchor_lib.anchors_for_image(config.anchors, IMAGE)
  gt, gt_valid = _padded_gt()
  loss = jax.jit(lambda key: rpn_lib.rpn_losses(
      config, anchors, [jnp.asarray(o) for o in tv['objectness']],
      [jnp.asarray(d) for d in tv['deltas']], gt, gt_valid, key=key))
  a, b, c = loss(jax.random.key(1)), loss(jax.random.key(1)), loss(jax.random.key(2))
  assert float(a['loss_rpn_cls']) == float(b['loss_rpn_cls'])
  assert float(a['loss_rpn_loc']) == float(b['loss_rpn_loc'])
  # Another key draws other negatives; the positives (fewer than 128 here) are all taken.
  assert float(a['loss_rpn_cls']) != float(c['loss_rpn_cls'])
  assert float(a['loss_rpn_loc']) == float(c['loss_rpn_loc'])


@pytest.mark.parametrize('config', [rpn_lib.RPNConfig(), rpn_lib.RPNConfig.torchvision()],
                         ids=['detectron2', 'torchvision'])
def test_whole_rpn_under_jit(config):
  """Head, proposals and losses in one jitted step: 2 images of different true sizes, one with
  no ground truth at all; finite losses and gradients, proposals inside each image."""
  padded, sizes = (64, 96), jnp.asarray([[64, 96], [40, 70]])
  anchors = anchor_lib.anchors_for_image(config.anchors, padded)
  shapes = anchor_lib.feature_shapes(padded)
  keys = jax.random.split(jax.random.key(0), 6)
  feats = [jax.random.normal(k, (2, h, w, 16)) for k, (h, w) in zip(keys, shapes)]
  head = rpn_lib.RPNHead(num_anchors=config.num_anchors)
  params = head.init(keys[5], feats)
  gt = jnp.asarray([[[4., 6., 30., 40.], [20., 10., 90., 60.]], [[0., 0., 0., 0.]] * 2])
  gt_valid = jnp.asarray([[True, True], [False, False]])

  @jax.jit
  def step(params, feats, sizes, key):
    def loss_fn(params):
      objectness, deltas = head.apply(params, feats)
      losses = rpn_lib.rpn_losses(config, anchors, objectness, deltas, gt, gt_valid, key=key)
      proposals = rpn_lib.propose(config, anchors, objectness, deltas, sizes, training=True)
      return losses['loss_rpn_cls'] + losses['loss_rpn_loc'], (losses, proposals)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (total, (losses, proposals)), grads = step(params, feats, sizes, jax.random.key(3))
  assert np.isfinite(float(total)) and float(losses['loss_rpn_loc']) > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  post = config.post_nms_topk[0]
  assert proposals.boxes.shape == (2, post, 4) and proposals.valid.shape == (2, post)
  for i in range(2):
    v = np.asarray(proposals.valid[i])
    b = np.asarray(proposals.boxes[i])[v]
    assert 0 < v.sum() < post and v[:v.sum()].all()
    assert (b >= 0).all() and (b[:, 2] <= sizes[i, 1]).all() and (b[:, 3] <= sizes[i, 0]).all()
    assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    logits = np.asarray(proposals.logits[i])[v]
    assert (np.diff(logits) <= 0).all() or config.nms_on_probabilities
