"""Detector weight conversion: torchvision and Detectron2 layouts, ImageNet bodies, errors."""
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax.convert import StateDictMismatchError
from reviewkd_jax.detection import backbone as bb
from reviewkd_jax.detection import weights as W
from tests.torch_utils import nchw_to_nhwc, torch, torchvision

A = 3  # anchors per location


def head_shapes(num_classes: int, mask: bool, channels: int = 256, fc: int = 1024,
                pooler: int = 7) -> dict:
  """Returns the pinned head params {module: {leaf: shape}} (K = num_classes foreground)."""
  k = num_classes
  conv = lambda kh, cin, cout: {'kernel': (kh, kh, cin, cout), 'bias': (cout,)}  # noqa: E731
  dense = lambda cin, cout: {'kernel': (cin, cout), 'bias': (cout,)}  # noqa: E731
  heads = {
      'rpn': {'conv': conv(3, channels, channels), 'objectness': conv(1, channels, A),
              'deltas': conv(1, channels, 4 * A)},
      'box_head': {'fc1': dense(channels * pooler * pooler, fc), 'fc2': dense(fc, fc)},
      'box_predictor': {'cls_score': dense(fc, k + 1), 'bbox_pred': dense(fc, 4 * k)},
  }
  if mask:
    heads['mask_head'] = {f'fcn{i}': conv(3, channels, channels) for i in range(1, 5)}
    heads['mask_head']['deconv'] = conv(2, channels, channels)
    heads['mask_head']['predictor'] = conv(1, channels, k)
  return heads


def detector_template(arch: str, num_classes: int, mask: bool, *, concrete: bool = False,
                      **backbone_kw) -> dict:
  """Returns a detector variables template: the Backbone's init plus the pinned heads."""
  model = bb.build_backbone(arch, **backbone_kw)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  heads = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                 head_shapes(num_classes, mask),
                                 is_leaf=lambda s: isinstance(s, tuple))
  if concrete:  # random stand-ins for initial values (running the init costs seconds)
    rng = np.random.default_rng(0)
    variables, heads = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(s.dtype), (variables, heads))
  return {'params': {'backbone': variables['params'], **heads},
          'batch_stats': {'backbone': variables['batch_stats']}}


def detectron2_state_dict(depth: int, num_classes: int = 80, mask: bool = False,
                          seed: int = 0) -> dict:
  """Returns random weights under the key names and shapes of Detectron2's R-{depth}-FPN
  model-zoo files (e.g. faster_rcnn_R_101_FPN_3x), generated from the architecture."""
  sizes, bottleneck = bb.RESNETS[f'resnet{depth}']
  shapes = {}

  def conv_norm(prefix, cout, cin, k):
    shapes[f'{prefix}.weight'] = (cout, cin, k, k)
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.norm.{leaf}'] = (cout,)

  def conv_bias(prefix, cout, cin, k):
    shapes[f'{prefix}.weight'] = (cout, cin, k, k)
    shapes[f'{prefix}.bias'] = (cout,)

  conv_norm('backbone.bottom_up.stem.conv1', 64, 3, 7)
  cin, widths = 64, []
  for s, blocks in enumerate(sizes):
    width = 64 * 2**s
    cout = 4 * width if bottleneck else width
    for b in range(blocks):
      p = f'backbone.bottom_up.res{s + 2}.{b}'
      if b == 0 and cin != cout:
        conv_norm(f'{p}.shortcut', cout, cin, 1)
      if bottleneck:
        conv_norm(f'{p}.conv1', width, cin, 1)
        conv_norm(f'{p}.conv2', width, width, 3)
        conv_norm(f'{p}.conv3', cout, width, 1)
      else:
        conv_norm(f'{p}.conv1', width, cin, 3)
        conv_norm(f'{p}.conv2', cout, width, 3)
      cin = cout
    widths.append(cout)
  for level, c in zip(range(2, 6), widths):
    conv_bias(f'backbone.fpn_lateral{level}', 256, c, 1)
    conv_bias(f'backbone.fpn_output{level}', 256, 256, 3)
  conv_bias('proposal_generator.rpn_head.conv', 256, 256, 3)
  conv_bias('proposal_generator.rpn_head.objectness_logits', A, 256, 1)
  conv_bias('proposal_generator.rpn_head.anchor_deltas', 4 * A, 256, 1)
  for name, cout, cin in (('box_head.fc1', 1024, 256 * 49), ('box_head.fc2', 1024, 1024),
                          ('box_predictor.cls_score', num_classes + 1, 1024),
                          ('box_predictor.bbox_pred', 4 * num_classes, 1024)):
    shapes[f'roi_heads.{name}.weight'] = (cout, cin)
    shapes[f'roi_heads.{name}.bias'] = (cout,)
  if mask:
    for i in range(1, 5):
      conv_bias(f'roi_heads.mask_head.mask_fcn{i}', 256, 256, 3)
    shapes['roi_heads.mask_head.deconv.weight'] = (256, 256, 2, 2)  # (in, out, kh, kw)
    shapes['roi_heads.mask_head.deconv.bias'] = (256,)
    conv_bias('roi_heads.mask_head.predictor', num_classes, 256, 1)
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def _write_pkl(path, sd, **extra):
  with open(path, 'wb') as f:
    pickle.dump({'model': sd, '__author__': 'Detectron2 Model Zoo', **extra}, f)
  return path


def _p(variables, path):
  node = variables
  for part in path.split('/'):
    node = node[part]
  return np.asarray(node)


# ------------------------------------------------------------------ ConvTranspose kernel


@pytest.mark.parametrize('kernel', [2, 3])
@pytest.mark.parametrize('transpose_kernel', [False, True])
def test_deconv_kernel_matches_torch_conv_transpose(kernel, transpose_kernel):
  torch.manual_seed(0)
  tconv = torch.nn.ConvTranspose2d(8, 6, kernel, stride=2)
  x = np.random.default_rng(0).standard_normal((2, 5, 7, 8)).astype(np.float32)
  with torch.no_grad():
    want = nchw_to_nhwc(tconv(torch.from_numpy(x.transpose(0, 3, 1, 2))))
  flax_conv = nn.ConvTranspose(6, (kernel, kernel), strides=(2, 2), padding='VALID',
                               transpose_kernel=transpose_kernel)
  params = {'kernel': W.deconv_kernel_from_torch(tconv.weight.detach().numpy(),
                                                 transpose_kernel),
            'bias': tconv.bias.detach().numpy()}
  got = np.asarray(flax_conv.apply({'params': params}, x))
  assert got.shape == want.shape == (2, 2 * 5 + kernel - 2, 2 * 7 + kernel - 2, 6)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if kernel > 1 and not transpose_kernel:  # the flip matters: unflipped is wrong
    params['kernel'] = tconv.weight.detach().numpy().transpose(2, 3, 0, 1)
    assert np.max(np.abs(np.asarray(flax_conv.apply({'params': params}, x)) - want)) > 1e-2


# ------------------------------------------------------------------------- torchvision


@pytest.fixture(scope='module')
def torch_mask_rcnn():
  from reviewkd_jax.testing import torch_detection as td  # pylint: disable=g-import-not-at-top
  return td.build('mask', num_classes=5)  # K = 4 foreground classes


def _conv(p, x, padding):
  k = p['kernel'].shape[0]
  return nn.Conv(p['kernel'].shape[-1], (k, k), padding=padding).apply({'params': p}, x)


def test_torchvision_mask_rcnn_heads_give_torchvisions_outputs(torch_mask_rcnn):
  """Converted heads applied the way our detector applies them == torchvision's heads, with
  background moved last (scores) or dropped (box deltas, mask logits)."""
  tm, k = torch_mask_rcnn, 4
  template = detector_template('resnet50', k, mask=True)
  loaded = W.load_detector_weights(tm.state_dict(), template)
  assert loaded.report.source == 'torchvision' and not loaded.report.left_at_init
  assert not loaded.report.dropped  # num_batches_tracked is skipped, not listed
  p = loaded.variables['params']
  rng = np.random.default_rng(0)
  with torch.no_grad():
    # RPN head on one level: (N, H, W, A) objectness and (N, H, W, 4A) deltas.
    feat = rng.standard_normal((1, 8, 10, 256)).astype(np.float32)
    obj, deltas = tm.rpn.head([torch.from_numpy(feat.transpose(0, 3, 1, 2))])
    h = nn.relu(_conv(p['rpn']['conv'], feat, ((1, 1), (1, 1))))
    np.testing.assert_allclose(_conv(p['rpn']['objectness'], h, 'VALID'),
                               nchw_to_nhwc(obj[0]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_conv(p['rpn']['deltas'], h, 'VALID'),
                               nchw_to_nhwc(deltas[0]), atol=1e-4, rtol=1e-4)
    # Box head: NHWC RoI features flattened as (7, 7, 256).
    rois = rng.standard_normal((3, 7, 7, 256)).astype(np.float32)
    t_hidden = tm.roi_heads.box_head(torch.from_numpy(rois.transpose(0, 3, 1, 2)))
    scores, box_deltas = tm.roi_heads.box_predictor(t_hidden)
    hidden = nn.relu(rois.reshape(3, -1) @ p['box_head']['fc1']['kernel']
                     + p['box_head']['fc1']['bias'])
    hidden = nn.relu(hidden @ p['box_head']['fc2']['kernel'] + p['box_head']['fc2']['bias'])
    np.testing.assert_allclose(hidden, t_hidden.numpy(), atol=1e-4, rtol=1e-4)
    cls = p['box_predictor']['cls_score']
    bbox = p['box_predictor']['bbox_pred']
    np.testing.assert_allclose(hidden @ cls['kernel'] + cls['bias'],
                               scores.numpy()[:, [1, 2, 3, 4, 0]], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(hidden @ bbox['kernel'] + bbox['bias'],
                               box_deltas.numpy()[:, 4:], atol=1e-4, rtol=1e-4)
    # Mask head: 4 x (3x3 conv + ReLU), ConvTranspose 2x2/2 + ReLU, 1x1 conv -> K logits.
    mrois = rng.standard_normal((2, 14, 14, 256)).astype(np.float32)
    t_logits = tm.roi_heads.mask_predictor(tm.roi_heads.mask_head(
        torch.from_numpy(mrois.transpose(0, 3, 1, 2))))
    m, x = p['mask_head'], mrois
    for i in range(1, 5):
      x = nn.relu(_conv(m[f'fcn{i}'], x, ((1, 1), (1, 1))))
    x = nn.relu(nn.ConvTranspose(256, (2, 2), strides=(2, 2), padding='VALID').apply(
        {'params': m['deconv']}, x))
    logits = _conv(m['predictor'], x, 'VALID')
    assert logits.shape == (2, 28, 28, k)
    np.testing.assert_allclose(logits, nchw_to_nhwc(t_logits[:, 1:]), atol=1e-4, rtol=1e-4)


def test_torchvision_file_that_does_not_fit_names_the_keys(torch_mask_rcnn):
  sd = dict(torch_mask_rcnn.state_dict())
  # Into a Faster R-CNN template: the mask keys are unexpected...
  with pytest.raises(StateDictMismatchError, match=r'Unexpected in the file \(12\)') as e:
    W.load_detector_weights(sd, detector_template('resnet50', 4, mask=False))
  assert 'roi_heads.mask_predictor.conv5_mask.weight (-> params/mask_head/deconv/kernel)' in (
      str(e.value))
  # ... unless asked to skip parts the template lacks (and then the rest must still fit).
  partial = W.load_detector_weights(sd, detector_template('resnet50', 4, mask=False),
                                    partial=True)
  assert len(partial.report.dropped) == 12 and not partial.report.left_at_init
  # Missing, unexpected and mis-shaped keys are all named.
  del sd['rpn.head.bbox_pred.bias']
  sd['roi_heads.extra.weight'] = torch.zeros(3, 3)
  sd['backbone.fpn.layer_blocks.0.0.weight'] = torch.zeros(256, 256, 1, 1)
  with pytest.raises(StateDictMismatchError) as e:
    W.load_detector_weights(sd, detector_template('resnet50', 4, mask=True))
  msg = str(e.value)
  assert 'Missing from the file (1):\n    params/rpn/deltas/bias' in msg
  assert 'Unexpected in the file (1):\n    roi_heads.extra.weight' in msg
  assert re.search(r'Wrong shape \(1\):\n    backbone\.fpn\.layer_blocks\.0\.0\.weight: file '
                   r'has \(256, 256, 1, 1\), model wants \(3, 3, 256, 256\)', msg)
  # A different number of classes is a shape mismatch, not a silent partial load.
  with pytest.raises(StateDictMismatchError, match='cls_score'):
    W.load_detector_weights(torch_mask_rcnn.state_dict(),
                            detector_template('resnet50', 80, mask=True))


# -------------------------------------------------------------------------- Detectron2


@pytest.mark.parametrize('mask', [False, True], ids=['faster_R_101_FPN_3x',
                                                     'mask_R_101_FPN_3x'])
def test_detectron2_model_zoo_pkl_r101(tmp_path, mask):
  sd = detectron2_state_dict(101, 80, mask=mask)
  extra = {} if mask else {'pixel_mean': np.zeros((3, 1, 1), np.float32),
                           'pixel_std': np.ones((3, 1, 1), np.float32)}
  path = _write_pkl(tmp_path / 'model_final.pkl', {**sd, **extra}, matching_heuristics=False)
  template = detector_template('resnet101', 80, mask=mask, stride_in_1x1=True)
  loaded = W.load_detector_weights(path, template)  # auto: .pkl -> detectron2
  v, report = loaded.variables, loaded.report
  assert report.source == 'detectron2'
  assert not report.left_at_init and sorted(report.dropped) == sorted(extra)
  # Every template leaf filled, one per file key (running stats included).
  n_leaves = len(jax.tree_util.tree_leaves(v))
  assert n_leaves == len(jax.tree_util.tree_leaves(template)) == len(sd)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(template)
  # Spot checks of placement and layout.
  np.testing.assert_array_equal(_p(v, 'params/backbone/body/conv1/kernel'),
                                sd['backbone.bottom_up.stem.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_p(v, 'params/backbone/body/bn1/scale'),
                                sd['backbone.bottom_up.stem.conv1.norm.weight'])
  np.testing.assert_array_equal(_p(v, 'batch_stats/backbone/body/layer3_22/bn2/var'),
                                sd['backbone.bottom_up.res4.22.conv2.norm.running_var'])
  np.testing.assert_array_equal(_p(v, 'params/backbone/body/layer2_0/downsample_1/scale'),
                                sd['backbone.bottom_up.res3.0.shortcut.norm.weight'])
  np.testing.assert_array_equal(
      _p(v, 'params/backbone/body/layer4_0/downsample_0/kernel'),
      sd['backbone.bottom_up.res5.0.shortcut.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_p(v, 'params/backbone/body/layer1_2/conv3/kernel'),
                                sd['backbone.bottom_up.res2.2.conv3.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_p(v, 'params/backbone/fpn/lateral_5/kernel'),
                                sd['backbone.fpn_lateral5.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_p(v, 'params/backbone/fpn/output_3/bias'),
                                sd['backbone.fpn_output3.bias'])
  np.testing.assert_array_equal(_p(v, 'params/rpn/deltas/kernel')[0, 0],
                                sd['proposal_generator.rpn_head.anchor_deltas.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(_p(v, 'params/rpn/objectness/bias'),
                                sd['proposal_generator.rpn_head.objectness_logits.bias'])
  # Detectron2's predictor is already background-last and class-specific without background.
  np.testing.assert_array_equal(_p(v, 'params/box_predictor/cls_score/kernel'),
                                sd['roi_heads.box_predictor.cls_score.weight'].T)
  np.testing.assert_array_equal(_p(v, 'params/box_predictor/bbox_pred/kernel'),
                                sd['roi_heads.box_predictor.bbox_pred.weight'].T)
  # fc1 rows follow our (h, w, c) flatten order; PyTorch's columns are (c, h, w).
  fc1, wt = _p(v, 'params/box_head/fc1/kernel'), sd['roi_heads.box_head.fc1.weight']
  for o, c, h, w in ((0, 0, 0, 1), (5, 255, 6, 6), (1023, 17, 3, 2)):
    assert fc1[(h * 7 + w) * 256 + c, o] == wt[o, c * 49 + h * 7 + w]
  if mask:
    np.testing.assert_array_equal(
        _p(v, 'params/mask_head/deconv/kernel'),
        sd['roi_heads.mask_head.deconv.weight'].transpose(2, 3, 0, 1)[::-1, ::-1])
    np.testing.assert_array_equal(_p(v, 'params/mask_head/fcn4/kernel'),
                                  sd['roi_heads.mask_head.mask_fcn4.weight'].transpose(2, 3, 1, 0))
    assert _p(v, 'params/mask_head/predictor/kernel').shape == (1, 1, 256, 80)
    # The 'chw' and transpose_kernel options.
    other = W.load_detector_weights(path, template, roi_flatten='chw',
                                    deconv_transpose_kernel=True).variables
    np.testing.assert_array_equal(_p(other, 'params/box_head/fc1/kernel'), wt.T)
    np.testing.assert_array_equal(
        _p(other, 'params/mask_head/deconv/kernel'),
        sd['roi_heads.mask_head.deconv.weight'].transpose(2, 3, 1, 0))


def test_detectron2_file_carries_its_input_convention(tmp_path):
  """A model-zoo file implies MSRA's input rules: they are reported, checked against a
  config, and filled into a run config that leaves them unset."""
  from configs import detection_default  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.detection import model as model_lib  # pylint: disable=g-import-not-at-top
  from reviewkd_jax.train import detection as det_train  # pylint: disable=g-import-not-at-top
  path = _write_pkl(tmp_path / 'model_final.pkl', detectron2_state_dict(101, 80))
  template = detector_template('resnet101', 80, mask=False, stride_in_1x1=True)
  loaded = W.load_detector_weights(path, template)
  assert loaded.convention == model_lib.MSRA_INPUT
  assert 'Input convention of these weights: BGR' in str(loaded.report)
  plain = model_lib.DetectorConfig(backbone='resnet101', num_classes=80)
  with pytest.raises(W.InputConventionError, match=r"stride_in_1x1=False \(the weights: True\)"):
    W.load_detector_weights(path, template, config=plain)
  # Overriding a field of the model-zoo preset is a plain override, not a TypeError.
  msra = model_lib.DetectorConfig.detectron2_msra(80, stride_in_1x1=True, mask=False)
  assert plain.with_input_convention(loaded.convention) == msra
  W.load_detector_weights(path, template, config=msra)
  with pytest.raises(W.InputConventionError, match='input_format'):
    W.load_detector_weights(path, template, config=model_lib.DetectorConfig.detectron2_msra(
        80, input_format='RGB'))
  # The run config: unset fields come from the file (student and teacher alike); set fields
  # are kept; torchvision's and ImageNet files imply torchvision's rules.
  config = detection_default.get_config()
  config.update(weights=str(path), method='reviewkd', teacher_weights=str(path),
                teacher_backbone='resnet101')
  config.input_format = 'BGR'
  resolved = det_train.resolve_input_conventions(config)
  for pre in ('', 'teacher_'):
    assert resolved[pre + 'stride_in_1x1'] is True
    assert tuple(resolved[pre + 'pixel_mean']) == model_lib.MSRA_BGR_MEAN
    assert tuple(resolved[pre + 'pixel_std']) == (1.0, 1.0, 1.0)
    assert resolved[pre + 'input_format'] == 'BGR'
  assert det_train.detector_config(resolved, 80).input_convention == model_lib.MSRA_INPUT
  assert W.implied_convention({'conv1.weight': 0}, 'imagenet') == model_lib.TORCHVISION_INPUT
  assert W.implied_convention({'teacher.x': 0}, 'detectron2', part='student') is None
  unset = detection_default.get_config()
  assert det_train.resolve_input_conventions(unset).input_format == 'RGB'   # no weights


def test_reviewkd_release_checkpoints_split_teacher_and_student():
  """The authors' files: teacher under 'teacher.', the student's ImageNet body under the
  Detectron2 names (their MobileNetV2 in the tonylins layout)."""
  teacher = detectron2_state_dict(18, 80)
  tv = torchvision().models.mobilenet_v2().state_dict()
  student = {f'backbone.bottom_up.{_to_tonylins(k)}': v.numpy() for k, v in tv.items()
             if k.startswith('features.') and not k.startswith('features.18.')
             and not k.endswith('num_batches_tracked')}
  sd = {**{f'teacher.{k}': v for k, v in teacher.items()}, **student}
  with pytest.raises(StateDictMismatchError, match="part='teacher'"):
    W.load_detector_weights(sd, detector_template('resnet18', 80, mask=False))
  t = W.load_detector_weights(sd, detector_template('resnet18', 80, mask=False), part='teacher')
  assert t.report.source == 'detectron2' and not t.report.left_at_init
  np.testing.assert_array_equal(_p(t.variables, 'params/backbone/body/layer2_0/conv1/kernel'),
                                teacher['backbone.bottom_up.res3.0.conv1.weight'].transpose(2, 3, 1, 0))
  s = W.load_detector_weights(sd, detector_template('mobilenet_v2', 80, mask=False,
                                                    concrete=True), part='student')
  assert all(m.startswith('backbone/body/') for m in s.report.filled)
  assert not any(m.startswith('backbone/body/') for m in s.report.left_at_init)
  assert 'rpn/conv' in s.report.left_at_init and len(s.report.dropped) == len(teacher)
  np.testing.assert_array_equal(
      _p(s.variables, 'params/backbone/body/features_5/conv_1_0/kernel'),
      tv['features.5.conv.1.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_p(s.variables, 'batch_stats/backbone/body/features_1/conv_2/mean'),
                                tv['features.1.conv.2.running_mean'].numpy())


def _to_tonylins(key: str) -> str:
  """Returns a torchvision mobilenet_v2 key in the tonylins layout (the inverse mapping)."""
  m = re.match(r'^features\.(\d+)\.conv\.([\d.]+)\.(\w+)$', key)
  if m:
    block, suffix, leaf = m.groups()
    table = W._TONYLINS_T1 if block == '1' else W._TONYLINS_T6  # pylint: disable=protected-access
    return f'features.{block}.conv.{dict((v, k) for k, v in table.items())[suffix]}.{leaf}'
  if key.startswith('features.18.'):
    return 'conv.' + key[len('features.18.'):]
  if key.startswith('classifier.1.'):
    return 'classifier.' + key[len('classifier.1.'):]
  return key


# ----------------------------------------------------------------------------- ImageNet


def test_imagenet_resnet18_fills_only_the_body():
  tv = torchvision().models.resnet18().state_dict()
  template = detector_template('resnet18', 80, mask=True, concrete=True)
  loaded = W.load_detector_weights(tv, template)  # auto: imagenet
  v, report = loaded.variables, loaded.report
  assert report.source == 'imagenet'
  assert sorted(report.dropped) == ['fc.bias', 'fc.weight']
  assert all(m.startswith('backbone/body/') for m in report.filled) and len(report.filled) == 40
  assert set(report.left_at_init) == (
      {f'backbone/fpn/{n}_{i}' for n in ('lateral', 'output') for i in range(2, 6)}
      | {'rpn/conv', 'rpn/objectness', 'rpn/deltas', 'box_head/fc1', 'box_head/fc2',
         'box_predictor/cls_score', 'box_predictor/bbox_pred', 'mask_head/deconv',
         'mask_head/predictor'} | {f'mask_head/fcn{i}' for i in range(1, 5)})
  assert 'Left at their initial values (21)' in str(report)
  np.testing.assert_array_equal(_p(v, 'params/backbone/body/layer3_0/downsample_0/kernel'),
                                tv['layer3.0.downsample.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_p(v, 'batch_stats/backbone/body/layer4_1/bn2/mean'),
                                tv['layer4.1.bn2.running_mean'].numpy())
  for path in ('params/backbone/fpn/lateral_3/kernel', 'params/box_head/fc1/kernel',
               'params/mask_head/deconv/bias'):
    np.testing.assert_array_equal(_p(v, path), _p(template, path))
  # An abstract template cannot supply what the file lacks.
  with pytest.raises(StateDictMismatchError, match='concrete template'):
    W.load_detector_weights(tv, detector_template('resnet18', 80, mask=False))


def test_imagenet_mobilenet_v2_tonylins_layout_loads_like_torchvision():
  tv = {k: v.numpy() for k, v in torchvision().models.mobilenet_v2().state_dict().items()}
  tony = {_to_tonylins(k): v for k, v in tv.items() if not k.endswith('num_batches_tracked')}
  assert 'features.2.conv.7.running_var' in tony and 'conv.0.weight' in tony
  for last_conv in (False, True):
    template = detector_template('mobilenet_v2', 80, mask=False, concrete=True,
                                 last_conv=last_conv)
    a = W.load_detector_weights(tv, template, source='imagenet')
    b = W.load_detector_weights(tony, template)
    assert a.report.filled == b.report.filled
    assert ('backbone/body/features_18_0' in a.report.filled) == last_conv
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, b.variables)


def test_detect_source():
  assert W.detect_source({'backbone.body.conv1.weight': 0}) == 'torchvision'
  assert W.detect_source({'rpn.head.conv.0.0.weight': 0}) == 'torchvision'
  assert W.detect_source({'backbone.bottom_up.stem.conv1.weight': 0}) == 'detectron2'
  assert W.detect_source({'stem.conv1.weight': 0, 'res2.0.conv1.weight': 0}) == 'detectron2'
  assert W.detect_source({'conv1.weight': 0, 'fc.weight': 0}) == 'imagenet'
  assert W.detect_source({'features.0.0.weight': 0}) == 'imagenet'
  with pytest.raises(StateDictMismatchError, match='Cannot tell'):
    W.detect_source({'encoder.weight': 0})
  # Rename rules, including torchvision's older (pre-Conv2dNormActivation) names.
  assert W.torchvision_rename('backbone.fpn.inner_blocks.3.weight') == (
      'backbone.fpn.lateral_5.weight')
  assert W.torchvision_rename('rpn.head.conv.weight') == 'rpn.conv.weight'
  assert W.torchvision_rename('roi_heads.mask_head.mask_fcn2.bias') == 'mask_head.fcn2.bias'
  assert W.detectron2_rename('backbone.bottom_up.res5.2.conv3.norm.running_mean') == (
      'backbone.body.layer4.2.bn3.running_mean')


def test_convert_torchvision_to_d2_layout_loads_as_detectron2(tmp_path):
  """`convert-torchvision-to-d2.py` output: D2 body names without 'backbone.bottom_up.'."""
  sd = {k[len('backbone.bottom_up.'):]: v for k, v in detectron2_state_dict(18).items()
        if k.startswith('backbone.bottom_up.')}
  path = _write_pkl(tmp_path / 'R-18.pkl', sd, matching_heuristics=True)
  loaded = W.load_detector_weights(path, detector_template('resnet18', 80, mask=False,
                                                            concrete=True), partial=True)
  assert loaded.report.source == 'detectron2'
  assert len(loaded.report.filled) == 40 and all(
      m.startswith('backbone/body/') for m in loaded.report.filled)
  np.testing.assert_array_equal(_p(loaded.variables, 'params/backbone/body/layer1_1/bn2/bias'),
                                sd['res2.1.conv2.norm.bias'])
