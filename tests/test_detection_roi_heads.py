"""RoIAlign and the RoI heads (box, mask): parity with torchvision, Detectron2's rules.

References: torchvision.ops.roi_align / MultiScaleRoIAlign and the RoI heads of torchvision's
`maskrcnn_resnet50_fpn` (random weights, `testing.torch_detection`, K = 4 foreground classes)
on two 128x160 images. On CPU torch torchvision's RoIAlign is its pure-PyTorch version, which
`torch.compile`s itself on first use (~12 s per configuration); the `tv` fixture runs the same
function eagerly instead. For adaptive sampling (sampling_ratio <= 0, used by torchvision's
mask targets) the eager version materialises (RoIs, C, out, out, H, W) tensors (2 s per RoI
here), so the fixture computes RoIs whose adaptive grid is square (g x g) with the same
function's fixed-ratio mode at ratio g: the same sample points and count, exact up to the
summation order (checked against adaptive mode in `test_fast_adaptive_reference_is_adaptive`).
Detectron2 is not installed: its rules are transcribed where needed (level mapper, paste).
"""
import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import convert
from reviewkd_jax.detection import roi_align as ra
from reviewkd_jax.detection import roi_heads as rh
from tests.torch_utils import torch


def paste_masks_in_image(*args):
  from torchvision.models.detection import roi_heads  # pylint: disable=g-import-not-at-top
  return roi_heads.paste_masks_in_image(*args)

K = 4            # foreground classes of td.build('mask', num_classes=5)
IMAGE = (128, 160)


def _adaptive_by_fixed(orig):
  """Returns torchvision's `_roi_align` computing square adaptive grids with fixed ratios."""

  def fn(inp, rois, spatial_scale, ph, pw, sampling_ratio, aligned):
    if sampling_ratio > 0 or rois.shape[0] == 0:
      return orig(inp, rois, spatial_scale, ph, pw, sampling_ratio, aligned)
    off = 0.5 if aligned else 0.0
    w = (rois[:, 3] * spatial_scale - off) - (rois[:, 1] * spatial_scale - off)
    h = (rois[:, 4] * spatial_scale - off) - (rois[:, 2] * spatial_scale - off)
    if not aligned:
      w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    gh, gw = torch.ceil(h / ph), torch.ceil(w / pw)
    out = torch.zeros((rois.shape[0], inp.shape[1], ph, pw), dtype=inp.dtype)
    for i in range(rois.shape[0]):
      g = int(gh[i])
      ratio = g if (g == int(gw[i]) and g > 0) else sampling_ratio
      out[i] = orig(inp, rois[i:i + 1], spatial_scale, ph, pw, ratio, aligned)[0]
    return out

  return fn


@pytest.fixture(scope='module')
def tv():
  """torchvision (CPU nms registered) with its RoIAlign run eagerly (see the docstring)."""
  from reviewkd_jax.testing import torch_detection as td  # pylint: disable=g-import-not-at-top
  td.detection_models()
  import torchvision  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module('torchvision.ops.roi_align')
  eager = getattr(mod._roi_align, '__wrapped__', mod._roi_align)  # pylint: disable=protected-access
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(mod, '_roi_align', _adaptive_by_fixed(eager))
    yield torchvision, eager


def _jit(fn, *args, **static):
  """Runs `fn(*args, **static)` under jit (op-by-op dispatch compiles every primitive)."""
  return jax.jit(functools.partial(fn, **static))(*args)


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _random_boxes(rng, n, max_xy, min_size, max_size):
  wh = np.minimum(rng.uniform(min_size, max_size, (n, 2)), np.asarray(max_xy, np.float64))
  xy = rng.uniform(0, 1, (n, 2)) * (np.asarray(max_xy) - wh)
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# --------------------------------------------------------------------------- RoIAlign


def test_roi_align_matches_torchvision(tv):
  torchvision, _ = tv
  roi_align = jax.jit(ra.roi_align, static_argnums=(3, 5, 6))   # one compile per (ratio, aligned)
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((2, 24, 30, 5)).astype(np.float32)
  for scale in (1.0, 0.25):
    boxes = _random_boxes(rng, 40, (30 / scale, 24 / scale), 0.3, 26 / scale)
    boxes[:3] = [[0, 0, 30 / scale, 24 / scale], [0.2, 0.1, 0.4, 0.3], [5, 5, 5, 5]]
    bidx = rng.integers(0, 2, 40)
    rois = torch.from_numpy(np.concatenate([bidx[:, None], boxes], 1).astype(np.float32))
    for aligned in (False, True):
      for ratio in (1, 2, 3):
        want = torchvision.ops.roi_align(_nchw(feats), rois, (7, 6), scale, ratio, aligned)
        got = roi_align(feats, boxes, bidx, (7, 6), scale, ratio, aligned)
        np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1),
                                   atol=5e-5, rtol=1e-5, err_msg=f'{scale} {aligned} {ratio}')


def _kernel_reference(feat, box, out, scale, ratio, aligned):
  """torchvision's C++ roi_align_forward_kernel for one RoI, as loops (numpy, float64)."""
  h, w, _ = feat.shape
  off = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (c * scale - off for c in box)
  rw, rh_ = x2 - x1, y2 - y1
  if not aligned:
    rw, rh_ = max(rw, 1.0), max(rh_, 1.0)
  res = np.zeros((out, out, feat.shape[-1]))
  for ph in range(out):
    for pw in range(out):
      for iy in range(ratio):
        y = y1 + ph * rh_ / out + (iy + 0.5) * rh_ / out / ratio
        for ix in range(ratio):
          x = x1 + pw * rw / out + (ix + 0.5) * rw / out / ratio
          if y < -1.0 or y > h or x < -1.0 or x > w:
            continue
          y, x = max(y, 0.0), max(x, 0.0)
          yl, xl = int(y), int(x)
          if yl >= h - 1:
            yl = yh = h - 1
            y = float(yl)
          else:
            yh = yl + 1
          if xl >= w - 1:
            xl = xh = w - 1
            x = float(xl)
          else:
            xh = xl + 1
          ly, lx = y - yl, x - xl
          res[ph, pw] += ((1 - ly) * (1 - lx) * feat[yl, xl] + (1 - ly) * lx * feat[yl, xh]
                          + ly * (1 - lx) * feat[yh, xl] + ly * lx * feat[yh, xh])
  return res / (ratio * ratio)


def test_samples_outside_the_map_are_zero_as_in_the_kernel():
  # torchvision's pure-PyTorch fallback clamps such samples instead; its C++/CUDA kernels (what
  # both libraries run on GPU) drop them, and so do we.
  rng = np.random.default_rng(1)
  feat = rng.standard_normal((1, 6, 7, 3)).astype(np.float32)
  boxes = np.array([[-6, -5, 4, 3], [3, 2, 12, 11], [-3, 1, 9, 4], [5, 5, 6, 6]], np.float32)
  for aligned in (False, True):
    got = _jit(ra.roi_align, feat, boxes, np.zeros(4, np.int32), output_size=3,
               spatial_scale=1.0, sampling_ratio=2, aligned=aligned)
    for i, box in enumerate(boxes):
      np.testing.assert_allclose(np.asarray(got[i]),
                                 _kernel_reference(feat[0], box, 3, 1.0, 2, aligned), atol=1e-5)


def _pyramid(rng, n=2, c=6, image=IMAGE):
  return [rng.standard_normal((n, image[0] // s, image[1] // s, c)).astype(np.float32)
          for s in (4, 8, 16, 32)]


def test_multiscale_roi_align_matches_torchvision(tv):
  torchvision, _ = tv
  rng = np.random.default_rng(2)
  image = (512, 640)   # large enough for boxes of every level
  feats = _pyramid(rng, image=image)
  boxes = np.concatenate([_random_boxes(rng, 30, image[::-1], lo, hi)
                          for lo, hi in ((2, 60), (40, 250), (250, 640))])
  boxes[0] = [0, 0, 112, 112]   # on a level boundary: sqrt(area) / 224 = 1/2
  per_image = [torch.from_numpy(boxes[:50]), torch.from_numpy(boxes[50:])]
  pooler = torchvision.ops.MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 2)
  want = pooler({str(i): _nchw(f) for i, f in enumerate(feats)}, per_image, [image, image])
  bidx = np.repeat([0, 1], [50, 40])
  got = _jit(ra.multiscale_roi_align, feats, boxes, bidx, output_size=7, sampling_ratio=2,
             aligned=False, level_rule='torchvision')
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=5e-5,
                             rtol=1e-5)
  tv_levels = pooler.map_levels([torch.from_numpy(boxes)]).numpy() + 2
  np.testing.assert_array_equal(ra.assign_levels(jnp.asarray(boxes), rule='torchvision'),
                                tv_levels)
  assert len(set(tv_levels.tolist())) == 4
  # Detectron2's assign_boxes_to_levels, transcribed.
  t = torch.from_numpy(boxes)
  size = torch.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]))
  d2 = torch.clamp(torch.floor(4 + torch.log2(size / 224 + 1e-8)), min=2, max=5)
  np.testing.assert_array_equal(ra.assign_levels(jnp.asarray(boxes)), d2.numpy())


def test_roi_align_maps_is_torchvision_adaptive_and_fixed(tv):
  _, eager = tv
  rng = np.random.default_rng(3)
  maps = (rng.uniform(size=(3, 40, 52)) > 0.5).astype(np.float32)
  # Non-square adaptive grids (eager torchvision computes them; small maps keep it cheap).
  boxes = np.array([[1, 2, 50, 17], [3.3, 0.7, 9.9, 38.2], [0, 0, 52, 40], [10, 10, 10.5, 30]],
                   np.float32)
  idx = np.array([0, 2, 1, 2])
  rois = torch.from_numpy(np.concatenate([idx[:, None], boxes], 1).astype(np.float32))
  for aligned, ratio in ((False, 0), (True, 0), (True, 2)):
    want = eager(torch.from_numpy(maps)[:, None], rois, 1.0, 7, 7, ratio, aligned)[:, 0]
    got = _jit(ra.roi_align_maps, maps, boxes, idx, output_size=7, sampling_ratio=ratio,
               aligned=aligned, chunk=3)
    # 1e-5: a sample coordinate (< 64) may differ by 1 ulp (FMA), times a slope <= 1.
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5,
                               err_msg=f'{aligned} {ratio}')


def test_fast_adaptive_reference_is_adaptive(tv):
  torchvision, eager = tv
  rng = np.random.default_rng(4)
  maps = torch.from_numpy(rng.uniform(size=(1, 1, 40, 40)).astype(np.float32))
  rois = torch.tensor([[0, 1.0, 2.0, 30.0, 33.0], [0, 4.0, 4.0, 10.0, 11.0]])
  for aligned in (False, True):
    np.testing.assert_allclose(torchvision.ops.roi_align(maps, rois, 14, 1.0, 0, aligned),
                               eager(maps, rois, 1.0, 14, 14, 0, aligned), atol=1e-6)


def test_fixed_ratio_two_equals_adaptive_where_adaptive_picks_two():
  # With the level mapper, a box with both sides in (28, 56] px sits on P2 at 7..14 feature
  # pixels per side, where the adaptive count is 2 x 2: the same samples as our fixed 2.
  rng = np.random.default_rng(5)
  feats = _pyramid(rng, n=1, c=1)
  boxes = _random_boxes(rng, 30, IMAGE[::-1], 28.5, 56)
  assert np.all(np.asarray(ra.assign_levels(jnp.asarray(boxes))) == 2)
  fixed = _jit(ra.multiscale_roi_align, feats, boxes, np.zeros(30, np.int32), output_size=7,
               sampling_ratio=2)[..., 0]
  adaptive = _jit(ra.roi_align_maps, feats[0][..., 0], boxes, np.zeros(30, np.int32),
                  output_size=7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
  np.testing.assert_allclose(np.asarray(fixed), np.asarray(adaptive), atol=1e-5)


def test_adaptive_pooler_is_detectron2s_adaptive_count():
  """sampling_ratio=0: every RoI gets ceil(side / 7) samples per bin side (the exact
  `roi_align_maps` above is the reference), up to the static cap; past the cap, only the
  RoIs that need more samples change."""
  rng = np.random.default_rng(6)
  feats = _pyramid(rng, n=2, c=1)
  boxes = np.concatenate([_random_boxes(rng, 24, IMAGE[::-1], 8, 60),
                          _random_boxes(rng, 16, IMAGE[::-1], 60, 150)])
  index = (np.arange(len(boxes)) % 2).astype(np.int32)
  level = np.asarray(ra.assign_levels(jnp.asarray(boxes)))
  side = (boxes[:, 2:] - boxes[:, :2]) * 2.0 ** -level[:, None]
  need = np.ceil(side / 7).max(1)
  assert need.max() >= 3 and need.min() == 1   # the boxes span several adaptive counts
  want = np.zeros((len(boxes), 7, 7), np.float32)
  for lvl in np.unique(level):
    sel = np.nonzero(level == lvl)[0]
    want[sel] = np.asarray(_jit(ra.roi_align_maps, feats[lvl - 2][..., 0], boxes[sel],
                                index[sel], output_size=7, spatial_scale=2.0 ** -lvl,
                                sampling_ratio=0, aligned=True))
  cap = int(need.max())
  got = _jit(ra.multiscale_roi_align, feats, boxes, index, output_size=7, sampling_ratio=0,
             max_sampling_ratio=cap)[..., 0]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  capped = np.asarray(_jit(ra.multiscale_roi_align, feats, boxes, index, output_size=7,
                           sampling_ratio=0, max_sampling_ratio=2)[..., 0])
  np.testing.assert_allclose(capped[need <= 2], want[need <= 2], atol=1e-5)
  assert np.abs(capped[need > 2] - want[need > 2]).max() > 1e-3


# ------------------------------------------------------------------------- the heads


class _Heads(nn.Module):
  """The three head modules under their pinned names, as the detector holds them."""
  config: rh.RoIHeadsConfig

  def setup(self):
    self.box_head = rh.BoxHead()
    self.box_predictor = rh.BoxPredictor(self.config.num_classes)
    self.mask_head = rh.MaskHead(self.config.num_classes)

  def __call__(self, features, proposals, proposal_valid, image_sizes):
    pooled = rh.pool(self.config, features, proposals, self.config.box_pool_size)
    logits, deltas = self.box_predictor(self.box_head(pooled))
    dets = rh.roi_inference(self.config, self.box_head, self.box_predictor, self.mask_head,
                            features, proposals, proposal_valid, image_sizes)
    return logits, deltas, dets

  def losses(self, features, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
             gt_masks, sample_masks):
    return rh.roi_losses(self.config, self.box_head, self.box_predictor, self.mask_head,
                         features, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
                         gt_masks, sample_masks=sample_masks)


def _template(config):
  feats = [jnp.zeros((1, IMAGE[0] // s, IMAGE[1] // s, 256)) for s in (4, 8, 16, 32)]
  return jax.eval_shape(lambda: _Heads(config).init(
      jax.random.key(0), feats, jnp.zeros((1, 8, 4)), jnp.ones((1, 8), bool),
      jnp.asarray([IMAGE])))


def _convert_heads(roi_heads, template):
  """torchvision's RoI-head weights -> our variables (local rename; see detection/weights.py)."""
  sd = {k: v.detach().numpy() for k, v in roi_heads.state_dict().items()}
  out = {}
  for key, value in sd.items():
    name = key.replace('box_head.fc6', 'box_head.fc1').replace('box_head.fc7', 'box_head.fc2')
    if key == 'box_head.fc6.weight':   # PyTorch flattens (C, 7, 7); we flatten (7, 7, C)
      value = value.reshape(-1, 256, 7, 7).transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
    if key.startswith('box_predictor.cls_score'):
      value = np.roll(value, -1, axis=0)                 # background first -> last
    if key.startswith('box_predictor.bbox_pred'):
      value = value[4:]
    if key.startswith('mask_head.'):
      i = int(key.split('.')[1])
      name = f'mask_head.fcn{i + 1}.{key.split(".")[-1]}'
    if key.startswith('mask_predictor.conv5_mask'):
      name = 'mask_head.deconv.' + key.split('.')[-1]
      if value.ndim == 4:   # (in, out, kh, kw) -> flipped (kh, kw, in, out) via the OIHW rule
        value = value.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    if key.startswith('mask_predictor.mask_fcn_logits'):
      name = 'mask_head.predictor.' + key.split('.')[-1]
      value = value[1:]
    out[name] = np.ascontiguousarray(value)
  return convert.torch_to_flax(out, template)


def test_modules_have_the_pinned_names_and_detectron2_init():
  config = rh.RoIHeadsConfig(num_classes=K)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, _template(config)['params'])
  assert shapes['box_head'] == {'fc1': {'kernel': (7 * 7 * 256, 1024), 'bias': (1024,)},
                                'fc2': {'kernel': (1024, 1024), 'bias': (1024,)}}
  assert shapes['box_predictor'] == {'cls_score': {'kernel': (1024, K + 1), 'bias': (K + 1,)},
                                     'bbox_pred': {'kernel': (1024, 4 * K), 'bias': (4 * K,)}}
  assert set(shapes['mask_head']) == {'fcn1', 'fcn2', 'fcn3', 'fcn4', 'deconv', 'predictor'}
  assert shapes['mask_head']['deconv']['kernel'] == (2, 2, 256, 256)
  assert shapes['mask_head']['predictor']['kernel'] == (1, 1, 256, K)
  key = jax.random.key(1)
  params = {
      'box_head': jax.jit(rh.BoxHead().init)(key, jnp.zeros((1, 7, 7, 256)))['params'],
      'box_predictor': rh.BoxPredictor(K).init(key, jnp.zeros((1, 1024)))['params'],
      'mask_head': jax.jit(rh.MaskHead(K).init)(key, jnp.zeros((1, 14, 14, 256)))['params']}
  biases = [v for p, v in jax.tree_util.tree_leaves_with_path(params) if 'bias' in str(p[-1])]
  assert len(biases) == 10 and all(float(jnp.abs(b).max()) == 0 for b in biases)

  def std(module, layer):
    return float(np.std(params[module][layer]['kernel']))

  fc1 = np.asarray(params['box_head']['fc1']['kernel'])
  bound = math.sqrt(3 / fc1.shape[0])                     # kaiming_uniform(a=1)
  assert np.abs(fc1).max() <= bound * (1 + 1e-6)
  assert abs(fc1.std() - bound / math.sqrt(3)) < 0.02 * bound
  assert abs(std('box_predictor', 'cls_score') - 0.01) < 0.001
  assert abs(std('box_predictor', 'bbox_pred') - 0.001) < 0.0001
  assert abs(std('mask_head', 'fcn1') - math.sqrt(2 / (9 * 256))) < 0.002   # fan_out, ReLU
  assert abs(std('mask_head', 'deconv') - math.sqrt(2 / (4 * 256))) < 0.002
  assert abs(std('mask_head', 'predictor') - 0.001) < 0.0002


def test_deconv_conversion_matches_torch_conv_transpose():
  rng = np.random.default_rng(6)
  deconv = torch.nn.ConvTranspose2d(3, 5, 2, 2)
  x = rng.standard_normal((2, 4, 6, 3)).astype(np.float32)
  want = deconv(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
  w = deconv.weight.detach().numpy()
  kernel = w.transpose(2, 3, 0, 1)[::-1, ::-1]          # what _convert_heads produces
  got = nn.ConvTranspose(5, (2, 2), strides=(2, 2), padding='VALID').apply(
      {'params': {'kernel': kernel, 'bias': deconv.bias.detach().numpy()}}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)


SIZES = [(128, 160), (100, 136)]   # the second image is declared smaller inside the batch


def _hooks(module, store, name):
  return module.register_forward_hook(lambda m, i, o: store.setdefault(name, o))


def _inside_for_fallback(boxes):
  """Boxes whose aligned=False RoI (sides forced >= 1 feature pixel) stays inside its level.

  Tiny proposals on the right/bottom image edge reach past the map once their side is forced
  to 1 feature pixel: there the kernels (and we) sample 0, torchvision's pure-PyTorch fallback
  clamps (see `test_samples_outside_the_map_are_zero_as_in_the_kernel`), so the parity test
  leaves them out (9% of these proposals).
  """
  level = np.asarray(ra.assign_levels(jnp.asarray(boxes.numpy()), rule='torchvision'))
  scale = torch.from_numpy(2.0 ** -level)
  lo = boxes[:, :2] * scale[:, None]
  side = ((boxes[:, 2:] - boxes[:, :2]) * scale[:, None]).clamp(min=1.0)
  size = torch.tensor(IMAGE[::-1], dtype=torch.float32) * scale[:, None]
  return torch.all(lo + side <= size, dim=1)


@pytest.fixture(scope='module')
def tv_inference(tv):
  """torchvision's Mask R-CNN heads (eval) on its own FPN features and RPN proposals."""
  from reviewkd_jax.testing import torch_detection as td  # pylint: disable=g-import-not-at-top
  model = td.build('mask', num_classes=K + 1)
  model.rpn._post_nms_top_n['testing'] = 150  # pylint: disable=protected-access
  with torch.no_grad():   # random mask logits are +-100: scale them to a few units
    model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.03)
  gen = torch.Generator().manual_seed(0)
  imgs = [torch.rand((3, *IMAGE), generator=gen) for _ in range(2)]
  store = {}
  handles = [_hooks(model.roi_heads.box_predictor, store, 'box'),
             _hooks(model.roi_heads.mask_predictor, store, 'mask')]
  with torch.no_grad():
    images, _ = model.transform(imgs)
    feats = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, feats)
    proposals = [p[_inside_for_fallback(p)] for p in proposals]
    dets, _ = model.roi_heads(feats, proposals, SIZES)
  for h in handles:
    h.remove()
  return dict(model=model, torch_feats=feats,
              feats=[feats[str(i)].numpy().transpose(0, 2, 3, 1) for i in range(4)],
              proposals=[p.numpy() for p in proposals], dets=dets,
              logits=store['box'][0].numpy(), deltas=store['box'][1].numpy())


def _pad(arrays, n, fill=0.0):
  out = np.full((len(arrays), n, *arrays[0].shape[1:]), fill, arrays[0].dtype)
  valid = np.zeros((len(arrays), n), bool)
  for i, a in enumerate(arrays):
    out[i, :len(a)] = a
    valid[i, :len(a)] = True
  return out, valid


def test_inference_matches_torchvision(tv, tv_inference):
  ref = tv_inference
  config = rh.RoIHeadsConfig.torchvision(K)
  variables = _convert_heads(ref['model'].roi_heads, _template(config))
  props, valid = _pad(ref['proposals'], 160)
  run = jax.jit(lambda v, f, p, pv: _Heads(config).apply(v, f, p, pv, jnp.asarray(SIZES)))
  logits, deltas, dets = run(variables, [jnp.asarray(f) for f in ref['feats']],
                             jnp.asarray(props), jnp.asarray(valid))
  counts = [len(p) for p in ref['proposals']]
  agreement = []
  ours_logits = np.concatenate([np.asarray(logits[i, :n]) for i, n in enumerate(counts)])
  ours_deltas = np.concatenate([np.asarray(deltas[i, :n]) for i, n in enumerate(counts)])
  want_logits = np.roll(ref['logits'], -1, axis=1)
  np.testing.assert_allclose(ours_logits, want_logits, atol=2e-4 * np.abs(want_logits).max())
  np.testing.assert_allclose(ours_deltas, ref['deltas'][:, 4:],
                             atol=2e-4 * np.abs(ref['deltas']).max())
  for i, det in enumerate(ref['dets']):
    n = len(det['boxes'])
    assert 20 < n and int(dets.valid[i].sum()) == n
    # Same detections in the same (score) order; compared as sets in case of near-ties.
    ob, os_, oc = (np.asarray(a[i, :n]) for a in (dets.boxes, dets.scores, dets.classes))
    tb, ts, tc = det['boxes'].numpy(), det['scores'].numpy(), det['labels'].numpy() - 1
    match = [np.nonzero((oc == tc[j]) & (np.abs(ob - tb[j]).max(1) < 1e-3)
                        & (np.abs(os_ - ts[j]) < 1e-5))[0] for j in range(n)]
    assert all(len(m) == 1 for m in match)
    order = np.concatenate(match)
    assert len(set(order.tolist())) == n
    np.testing.assert_allclose(ob[order], tb, atol=1e-3)
    # Mask probabilities of the predicted class (28x28), except for boxes where the fallback
    # RoIAlign differs from the kernels (see `_inside_for_fallback`).
    probs = np.asarray(dets.masks[i, :n])[order]
    inside = _inside_for_fallback(det['boxes']).numpy()
    assert inside.mean() > 0.9
    np.testing.assert_allclose(probs[inside], det['masks'][inside, 0].numpy(), atol=2e-4)
    # Pasted masks: torchvision's rule on its own inputs, then end to end.
    tv_masks, tv_boxes = det['masks'], det['boxes']
    want = paste_masks_in_image(tv_masks, tv_boxes, SIZES[i])[:, 0].numpy()
    got = _jit(rh.paste_masks, tv_masks[:, 0].numpy(), tv_boxes.numpy(), height=SIZES[i][0],
               width=SIZES[i][1], rule='torchvision')
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    got = np.asarray(_jit(rh.paste_masks, probs, ob[order], height=SIZES[i][0],
                          width=SIZES[i][1], rule='torchvision'))
    agree = ((got > 0.5) == (want > 0.5))[inside].mean()
    assert agree > 0.999, agree
    agreement.append(agree)
  # Fewer pre-NMS candidates (static top-k) change nothing while >= 100 boxes survive.
  def variants(*args):
    return (rh.detect(*args, min_box_size=1e-2, max_candidates=300),
            rh.detect(*args, min_box_size=1e-2, score_threshold=0.9))

  fewer, high = jax.jit(variants)(logits, deltas, jnp.asarray(props), jnp.asarray(valid),
                                  jnp.asarray(SIZES))
  for a, b in zip(fewer, dets[:5]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  print(f'pasted-mask pixel agreement at 0.5: {min(agreement):.5f}')
  # A binding score threshold (random weights give > 100 detections above 0.05): torchvision's
  # postprocess_detections on its own logits with score_thresh 0.9.
  heads = ref['model'].roi_heads
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(heads, 'score_thresh', 0.9)
    want = heads.postprocess_detections(torch.from_numpy(ref['logits']),
                                        torch.from_numpy(ref['deltas']),
                                        [torch.from_numpy(p) for p in ref['proposals']], SIZES)
  for i, (boxes, scores, labels) in enumerate(zip(*want)):
    n = len(boxes)
    assert 5 < n < 100 and int(high.valid[i].sum()) == n
    np.testing.assert_array_equal(np.asarray(high.classes[i, :n]), labels.numpy() - 1)
    np.testing.assert_allclose(np.asarray(high.boxes[i, :n]), boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose(np.asarray(high.scores[i, :n]), scores.numpy(), atol=1e-5)


def _detectron2_paste(masks, boxes, height, width):
  """Detectron2's `_do_paste_mask(skip_empty=False)`, transcribed (soft, no threshold)."""
  f = torch.nn.functional
  x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
  img_y = (torch.arange(0, height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
  img_x = (torch.arange(0, width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
  n = masks.shape[0]
  gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
  gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
  return f.grid_sample(masks[:, None], torch.stack([gx, gy], dim=3), align_corners=False)[:, 0]


def test_paste_masks_detectron2_rule():
  rng = np.random.default_rng(7)
  masks = rng.uniform(size=(12, 28, 28)).astype(np.float32)
  boxes = _random_boxes(rng, 12, (70, 60), 0.5, 60)
  boxes[0] = [-5.3, -2.0, 40.2, 30.7]        # partly outside the canvas
  boxes[1] = [10.0, 10.0, 10.4, 12.0]        # thinner than a pixel
  want = _detectron2_paste(torch.from_numpy(masks), torch.from_numpy(boxes), 50, 64)
  got = _jit(rh.paste_masks, masks, boxes, height=50, width=64)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)
  # torchvision's rule on the same inputs
  got = _jit(rh.paste_masks, masks, boxes, height=50, width=64, rule='torchvision')
  want = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                              (50, 64))[:, 0]
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def _scene(seed):
  """Ground truth (boxes 36..44 px, labels 1..K, elliptic masks) and proposals around it."""
  rng = np.random.default_rng(seed)
  gts, labels, masks, proposals = [], [], [], []
  yy, xx = np.mgrid[:IMAGE[0], :IMAGE[1]] + 0.5
  for (h, w), g in zip(SIZES, (3, 2)):
    boxes = []
    while len(boxes) < g:   # well inside the image, not overlapping much
      box = _random_boxes(rng, 1, (w - 8, h - 8), 36, 44)[0] + 4
      if all(np.abs(box - b).max() > 20 for b in boxes):
        boxes.append(box)
    boxes = np.stack(boxes)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    masks.append((((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2
                  + ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 <= 1)
                 .astype(np.uint8))
    gts.append(boxes)
    labels.append(rng.integers(1, K + 1, g))
    jitter = np.repeat(boxes, 8, 0) + rng.uniform(-3, 3, (8 * g, 4)).astype(np.float32)
    props = np.concatenate([jitter] + [_random_boxes(rng, n, (w, h), lo, hi) for n, lo, hi in
                                       ((40, 30, 50), (20, 100, 160), (20, 8, 20))])
    props = torch.from_numpy(props.astype(np.float32))
    proposals.append(props[_inside_for_fallback(props)])
  return gts, labels, masks, proposals


class _Recorder:
  """Wraps torchvision's fg_bg_sampler and records the masks it draws."""

  def __init__(self, sampler):
    self.sampler, self.calls = sampler, []

  def __call__(self, labels):
    pos, neg = self.sampler(labels)
    self.calls.append((pos, neg))
    return pos, neg


@pytest.fixture(scope='module')
def variables(tv_inference):
  return _convert_heads(tv_inference['model'].roi_heads,
                        _template(rh.RoIHeadsConfig.torchvision(K)))


def test_training_losses_match_torchvision(tv, tv_inference, variables):
  # pylint: disable-next=g-import-not-at-top
  from torchvision.models.detection import _utils as det_utils
  heads = tv_inference['model'].roi_heads
  gts, labels, masks, proposals = _scene(8)
  recorder = _Recorder(det_utils.BalancedPositiveNegativeSampler(64, 0.25))
  targets = [dict(boxes=torch.from_numpy(b), labels=torch.from_numpy(l),
                  masks=torch.from_numpy(m)) for b, l, m in zip(gts, labels, masks)]
  with pytest.MonkeyPatch.context() as mp, torch.no_grad():
    mp.setattr(heads, 'fg_bg_sampler', recorder)
    heads.train()
    try:
      want = heads(tv_inference['torch_feats'], proposals, SIZES, targets)[1]
    finally:
      heads.eval()
  (pos, neg), = recorder.calls
  # Our candidates: P padded proposals, then G padded ground-truth boxes.
  p_max, g_max = 110, 3
  props, pvalid = _pad([p.numpy() for p in proposals], p_max)
  gt_boxes, gt_valid = _pad(gts, g_max)
  gt_classes, _ = _pad([l - 1 for l in labels], g_max)
  gt_masks, _ = _pad(masks, g_max)
  masks_ours = []
  for sampled in (pos, neg):
    m = np.zeros((2, p_max + g_max), bool)
    for b, (s_, n) in enumerate(zip(sampled, [len(p) for p in proposals])):
      s_ = s_.numpy().astype(bool)
      m[b, :n], m[b, p_max:p_max + len(s_) - n] = s_[:n], s_[n:]
    masks_ours.append(m)
  assert masks_ours[0].sum() == 32 and masks_ours[1].sum() == 96   # 16 + 48 per image
  config = rh.RoIHeadsConfig.torchvision(K, batch_size_per_image=64)
  run = jax.jit(lambda *a: _Heads(config).apply(variables, *a, method=_Heads.losses))
  got, samples = run([jnp.asarray(f) for f in tv_inference['feats']], props, pvalid, gt_boxes,
                     gt_classes, gt_valid, gt_masks, tuple(masks_ours))
  assert np.asarray(samples.valid).sum() == 128 and np.asarray(samples.foreground).sum() == 32
  assert not np.asarray(samples.foreground[:, 16:]).any()       # foreground slots first
  for ours, theirs in (('loss_cls', 'loss_classifier'), ('loss_box_reg', 'loss_box_reg'),
                       ('loss_mask', 'loss_mask')):
    print(f'{ours}: ours {float(got[ours]):.7f} torchvision {float(want[theirs]):.7f}')
    np.testing.assert_allclose(float(got[ours]), float(want[theirs]), rtol=2e-5,
                               err_msg=ours)


def test_detectron2_mask_targets_are_its_crop_and_resize(tv):
  # BitMasks.crop_and_resize: ROIAlign((28, 28), 1.0, 0, aligned=True) (torchvision's op),
  # then >= 0.5.
  torchvision, _ = tv
  gts, _, masks, proposals = _scene(9)
  boxes = [p[:8 * len(g)].numpy() for p, g in zip(proposals, gts)]   # jittered ground truth
  matched = [np.repeat(np.arange(len(g)), 8) for g in gts]
  want = [torchvision.ops.roi_align(torch.from_numpy(m)[:, None].float(),
                                    torch.from_numpy(np.concatenate([i[:, None], b], 1)),
                                    28, 1.0, 0, True)[:, 0].numpy() >= 0.5
          for m, b, i in zip(masks, boxes, matched)]
  gt_masks, _ = _pad(masks, 3)
  b_pad, _ = _pad(boxes, 24)
  i_pad, _ = _pad(matched, 24)
  got = np.asarray(_jit(rh.mask_targets, gt_masks, b_pad, i_pad))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1, :16], want[1])
  assert 0.2 < got.mean() < 0.8


def test_sampling_is_static_reproducible_and_foreground_first():
  rng = np.random.default_rng(10)
  gts = _random_boxes(rng, 3, (160, 128), 30, 60)[None]
  props = np.concatenate([np.repeat(gts[0], 100, 0) + rng.uniform(-4, 4, (300, 4)),
                          _random_boxes(rng, 700, (160, 128), 5, 120)]).astype(np.float32)[None]
  props = np.concatenate([props, np.zeros_like(props)])        # image 2: no proposals...
  pvalid = np.stack([np.ones(1000, bool), np.zeros(1000, bool)])
  pvalid[1, :10] = True                                         # ...but ten empty boxes
  gt_boxes = np.concatenate([gts, gts])
  gt_valid = np.array([[True, True, False], [False, False, False]])   # image 2: no GT
  sample = jax.jit(functools.partial(rh.sample_rois, num_classes=K))
  args = (props, pvalid, gt_boxes, np.array([[0, 3, 1]] * 2), gt_valid)
  a = sample(jax.random.key(0), *args)
  b = sample(jax.random.key(0), *args)
  c = sample(jax.random.key(1), *args)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a.boxes, c.boxes)
  assert a.boxes.shape == (2, 512, 4) and a.targets.shape == (2, 512, 4)
  fg = np.asarray(a.foreground)
  assert fg[0].sum() == 128 and fg[0, :128].all() and a.valid[0].all()
  assert fg[1].sum() == 0 and a.valid[1].sum() == 10             # background only
  assert set(np.asarray(a.classes[0, :128]).tolist()) == {0, 3}  # GT row 2 is padding
  assert np.all(np.asarray(a.classes)[~fg] == K)
  assert np.all(np.asarray(a.targets)[~fg] == 0) and np.isfinite(np.asarray(a.targets)).all()


def test_detectron2_box_loss_is_l1_sum_over_sampled():
  # FastRCNNOutputLayers.losses with smooth_l1_beta=0: cross_entropy mean, and
  # smooth_l1_loss(beta=0) == L1 summed over foreground (their class's deltas) / #sampled.
  f = torch.nn.functional
  rng = np.random.default_rng(13)
  logits = rng.standard_normal((2, 6, K + 1)).astype(np.float32)
  deltas = rng.standard_normal((2, 6, 4 * K)).astype(np.float32)
  targets = rng.standard_normal((2, 6, 4)).astype(np.float32)
  classes = np.array([[0, 3, K, K, K, K], [2, K, K, K, K, K]])
  valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
  fg = valid & (classes < K)
  samples = rh.RoISamples(None, valid, fg, classes, None, np.where(fg[..., None], targets, 0))
  for beta in (0.0, 1 / 9):
    got = rh.box_losses(logits, deltas, samples, smooth_l1_beta=beta)
    pred = deltas.reshape(2, 6, K, 4)[fg, classes[fg]]
    want_box = f.smooth_l1_loss(torch.from_numpy(pred), torch.from_numpy(targets[fg]),
                                beta=beta, reduction='sum') / valid.sum()
    want_cls = f.cross_entropy(torch.from_numpy(logits[valid]), torch.from_numpy(classes[valid]))
    np.testing.assert_allclose(float(got['loss_box_reg']), float(want_box), rtol=1e-6)
    np.testing.assert_allclose(float(got['loss_cls']), float(want_cls), rtol=1e-6)


def test_gradients_are_finite_with_padding():
  config = rh.RoIHeadsConfig(num_classes=K, batch_size_per_image=32)
  rng = np.random.default_rng(11)
  feats = [jnp.asarray(f) for f in _pyramid(rng, n=2, c=8)]
  gts, labels, masks, proposals = _scene(12)
  props, pvalid = _pad([p.numpy() for p in proposals], 110)     # zero boxes as padding
  gt_boxes, gt_valid = _pad(gts, 3)
  gt_classes, _ = _pad([l - 1 for l in labels], 3)
  gt_masks, _ = _pad(masks, 3)

  class Small(nn.Module):
    def setup(self):
      self.box_head = rh.BoxHead(hidden=16)
      self.box_predictor = rh.BoxPredictor(K)
      self.mask_head = rh.MaskHead(K, conv_dims=8)

    def __call__(self, feats, key):
      return rh.roi_losses(config, self.box_head, self.box_predictor, self.mask_head, feats,
                           props, pvalid, gt_boxes, gt_classes, gt_valid, gt_masks, key=key)[0]

    def shapes(self):   # cheap init
      self.box_predictor(self.box_head(jnp.zeros((1, 7, 7, 8))))
      self.mask_head(jnp.zeros((1, 14, 14, 8)))

  key = jax.random.key(0)
  params = Small().init(key, method=Small.shapes)

  def total(params, feats):
    losses = Small().apply(params, feats, key)
    return sum(losses.values()), losses

  (_, losses), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
      params, feats)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in losses.values())
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads[1][0]).sum()) > 0                  # reaches the features
