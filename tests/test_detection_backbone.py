"""Detection backbones and FPN: parity with torchvision (weights converted), shapes, freezing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reviewkd_jax.detection import backbone as bb
from reviewkd_jax.models import layers
from reviewkd_jax.detection.weights import load_detector_weights
from tests.torch_utils import nchw_to_nhwc, randomize, torch, torchvision

LEVELS = ('p2', 'p3', 'p4', 'p5', 'p6')
TORCH_LEVELS = ('0', '1', '2', '3', 'pool')
# Worst |ours - torch| / max|torch| per map. float32 through 50+ layers with reassociated
# sums (XLA vs oneDNN) measures ~1e-6; 1e-4 leaves room for other CPUs while catching any
# real mistake (a wrong stride, padding or kernel layout gives O(1)).
RTOL = 1e-4


def _images(n=2, h=128, w=160, seed=0):
  return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


def _abstract_vars(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _relative_errors(ours: dict, theirs: dict, label: str) -> dict:
  """Returns {level: max|ours - theirs| / max|theirs|}, checking shapes; prints abs and rel."""
  out = {}
  for mine, ref in zip(LEVELS, TORCH_LEVELS):
    a = np.asarray(ours[mine], np.float64)
    b = nchw_to_nhwc(theirs[ref]).astype(np.float64)
    assert a.shape == b.shape, (mine, a.shape, b.shape)
    worst = float(np.max(np.abs(a - b)))
    out[mine] = worst / float(np.max(np.abs(b)))
    print(f'{label} {mine} {a.shape}: max abs error {worst:.2e} (max |torch| '
          f'{np.max(np.abs(b)):.2e}), rel {out[mine]:.1e}')
  return out


def _randomize_frozen_bn(module, seed=1):
  """Gives torchvision FrozenBatchNorm2d buffers non-trivial values (it has no parameters)."""
  gen = torch.Generator().manual_seed(seed)
  frozen = torchvision().ops.misc.FrozenBatchNorm2d
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, frozen):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.75)


def test_resnet50_fpn_matches_torchvision_faster_rcnn_backbone():
  from reviewkd_jax.testing import torch_detection as td  # pylint: disable=g-import-not-at-top
  tmodel = td.build('faster', num_classes=5)
  sd = {k: v for k, v in tmodel.state_dict().items() if k.startswith('backbone.')}
  model = bb.build_backbone('resnet50')
  template = {k: {'backbone': v} for k, v in _abstract_vars(model).items()}
  variables, report = load_detector_weights(sd, template, source='torchvision')
  assert not report.left_at_init
  x = _images()
  ours = jax.jit(lambda v, x: model.apply(v, x))(
      {k: v['backbone'] for k, v in variables.items()}, x)
  with torch.no_grad():
    theirs = tmodel.backbone(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  errors = _relative_errors(ours, theirs, 'resnet50 FPN vs torchvision Faster R-CNN backbone')
  assert max(errors.values()) < RTOL, errors


def test_resnet18_fpn_matches_torchvision_resnet_fpn_backbone():
  backbone_utils = torchvision().models.detection.backbone_utils
  torch.manual_seed(0)
  tmodel = backbone_utils.resnet_fpn_backbone(backbone_name='resnet18', weights=None).eval()
  _randomize_frozen_bn(tmodel)
  sd = {f'backbone.{k}': v for k, v in tmodel.state_dict().items()}
  model = bb.build_backbone('resnet18')
  template = {k: {'backbone': v} for k, v in _abstract_vars(model).items()}
  variables = load_detector_weights(sd, template).variables  # source detected: torchvision
  x = _images(seed=1)
  ours = jax.jit(lambda v, x: model.apply(v, x))(
      {k: v['backbone'] for k, v in variables.items()}, x)
  with torch.no_grad():
    theirs = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  errors = _relative_errors(ours, theirs, 'resnet18 FPN vs resnet_fpn_backbone')
  assert max(errors.values()) < RTOL, errors


@pytest.mark.parametrize('last_conv', [False, True])
def test_mobilenet_v2_body_matches_torchvision_features(last_conv):
  torch.manual_seed(0)
  x = _images(1, 96, 128, seed=2)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  tmodel = randomize(torchvision().models.mobilenet_v2(), calibrate=xt).eval()
  with torch.no_grad():
    feats, h = [], xt
    for i, layer in enumerate(tmodel.features):
      h = layer(h)
      if i in (3, 6, 13, 18 if last_conv else 17):
        feats.append(h)
  model = bb.build_backbone('mobilenet_v2', last_conv=last_conv, with_body=True)
  template = {k: {'backbone': v} for k, v in
              jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), _abstract_vars(model)).items()}
  loaded = load_detector_weights(tmodel.state_dict(), template, source='imagenet')
  # The FPN keeps its initial values; the classifier (and features.18 unless used) is dropped.
  assert all(m.startswith('backbone/fpn/') for m in loaded.report.left_at_init)
  assert len(loaded.report.left_at_init) == 8
  assert 'classifier.1.weight' in loaded.report.dropped
  assert ('features.18.0.weight' in loaded.report.dropped) != last_conv
  ours = jax.jit(lambda v, x: model.apply(v, x))(
      {k: v['backbone'] for k, v in loaded.variables.items()}, x)
  for i, ref in enumerate(feats):
    b = nchw_to_nhwc(ref)
    a = np.asarray(ours[f'c{i + 2}'])
    assert a.shape == b.shape
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    print(f'mobilenet_v2 c{i + 2} {b.shape}: max abs error {np.max(np.abs(a - b)):.2e}, '
          f'rel {err:.1e}')
    assert err < RTOL


def test_stride_in_1x1_matches_a_torch_resnet_with_the_stride_moved():
  """Detectron2's MSRA Bottleneck: the stage's stride on conv1 (1x1) instead of conv2."""
  torch.manual_seed(0)
  x = _images(1, 64, 64, seed=3)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  tmodel = torchvision().models.resnet50()
  for stage in (tmodel.layer2, tmodel.layer3, tmodel.layer4):
    stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
  randomize(tmodel, calibrate=xt).eval()
  with torch.no_grad():
    h = tmodel.maxpool(tmodel.relu(tmodel.bn1(tmodel.conv1(xt))))
    feats = []
    for stage in (tmodel.layer1, tmodel.layer2, tmodel.layer3, tmodel.layer4):
      h = stage(h)
      feats.append(h)
  body = bb.ResNetBody((3, 4, 6, 3), bottleneck=True, stride_in_1x1=True)
  template = {k: {'backbone': {'body': v}} for k, v in _abstract_vars(body).items()}
  sd = {k: v for k, v in tmodel.state_dict().items() if not k.startswith('fc.')}
  loaded = load_detector_weights(sd, template, source='imagenet')
  assert not loaded.report.left_at_init
  ours = body.apply({k: v['backbone']['body'] for k, v in loaded.variables.items()}, x)
  for a, ref in zip(ours, feats):
    b = nchw_to_nhwc(ref)
    err = np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))
    assert err < RTOL, err
  # The same weights without the option give a different network.
  plain = bb.ResNetBody((3, 4, 6, 3), bottleneck=True).apply(
      {k: v['backbone']['body'] for k, v in loaded.variables.items()}, x)
  assert np.max(np.abs(np.asarray(plain[-1]) - nchw_to_nhwc(feats[-1]))) > 1e-2


@pytest.mark.parametrize('name', bb.BACKBONES)
def test_builders_give_the_pyramid_shapes(name):
  model = bb.build_backbone(name, with_body=True)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                  jax.ShapeDtypeStruct((2, 128, 160, 3), jnp.float32))
  assert {k: v.shape for k, v in out.items() if k.startswith('p')} == {
      f'p{i}': (2, 128 >> i, -(-160 >> i), 256) for i in range(2, 7)}
  widths = {'resnet18': (64, 128, 256, 512), 'resnet34': (64, 128, 256, 512),
            'mobilenet_v2': (24, 32, 96, 320)}.get(name, (256, 512, 1024, 2048))
  assert [out[f'c{i}'].shape[-1] for i in range(2, 6)] == list(widths)
  assert set(variables['params']) == {'body', 'fpn'}
  assert sorted(variables['params']['fpn']) == sorted(
      [f'lateral_{i}' for i in range(2, 6)] + [f'output_{i}' for i in range(2, 6)])
  with pytest.raises(ValueError, match='Unknown backbone'):
    bb.build_backbone('resnet152')


def test_upsample_nearest_matches_torch_interpolate_on_odd_sizes():
  x = np.random.default_rng(0).standard_normal((1, 5, 7, 3)).astype(np.float32)
  for size in ((10, 14), (9, 13), (11, 15)):
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                           size=size, mode='nearest')
    np.testing.assert_array_equal(np.asarray(layers.nearest_resize(jnp.asarray(x), size)),
                                  nchw_to_nhwc(want))


def _detector_params(arch):
  variables = _abstract_vars(bb.build_backbone(arch))
  return {'backbone': variables['params'],
          'rpn': {'conv': {'kernel': jnp.zeros((3, 3, 256, 256)), 'bias': jnp.zeros(256)}}}


def test_frozen_param_mask_resnet():
  params = _detector_params('resnet50')
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  body = lambda m: m['backbone']['body']  # noqa: E731
  mask = bb.frozen_param_mask(params, freeze_at=2)
  assert body(mask)['conv1']['kernel'] and body(mask)['bn1']['scale']
  assert all(jax.tree_util.tree_leaves(body(mask)['layer1_2']))
  assert not body(mask)['layer2_0']['conv1']['kernel']
  assert body(mask)['layer2_0']['bn1']['scale'] and body(mask)['layer4_2']['bn3']['bias']
  assert body(mask)['layer3_0']['downsample_1']['bias']
  assert not body(mask)['layer3_0']['downsample_0']['kernel']
  assert not any(jax.tree_util.tree_leaves(mask['backbone']['fpn']))
  assert not any(jax.tree_util.tree_leaves(mask['rpn']))
  # freeze_at=0: only the BatchNorms; also on a variables dict and under a prefix.
  mask0 = bb.frozen_param_mask({'params': {'student': params}}, freeze_at=0,
                               body_path=('student', 'backbone', 'body'))['params']['student']
  assert not body(mask0)['conv1']['kernel'] and body(mask0)['bn1']['scale']
  frozen = sum(jax.tree_util.tree_leaves(mask0))
  bn_leaves = 2 * (1 + 3 * (3 + 4 + 6 + 3) + 4)
  assert frozen == bn_leaves
  # With optax, frozen leaves do not move.
  labels = jax.tree_util.tree_map(lambda f: 'frozen' if f else 'train', mask)
  tx = optax.multi_transform({'train': optax.sgd(0.1), 'frozen': optax.set_to_zero()}, labels)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(jnp.abs(body(new)['layer1_0']['conv2']['kernel']).max()) == 0
  assert float(jnp.abs(body(new)['layer2_0']['conv2']['kernel']).max()) > 0


def test_frozen_param_mask_mobilenet_v2():
  params = _detector_params('mobilenet_v2')
  mask = bb.frozen_param_mask(params, freeze_at=2)['backbone']['body']
  for name in ('features_0_0', 'features_1', 'features_3'):
    assert all(jax.tree_util.tree_leaves(mask[name])), name
  assert not mask['features_4']['conv_0_0']['kernel'] and mask['features_4']['conv_0_1']['scale']
  assert not mask['features_17']['conv_2']['kernel']
  mask5 = bb.frozen_param_mask(params, freeze_at=5)
  assert all(jax.tree_util.tree_leaves(mask5['backbone']['body']))
  assert not any(jax.tree_util.tree_leaves(mask5['backbone']['fpn']))
