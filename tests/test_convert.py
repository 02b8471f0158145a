"""State_dict conversion: error reporting, wrappers, files, round trips, authors' ReviewKD keys."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax import convert
from reviewkd_jax.distill import reviewkd
from reviewkd_jax.models import create_model

torch = pytest.importorskip('torch')
from reviewkd_jax import testing as torch_reference  # noqa: E402
from reviewkd_jax.testing import torch_reviewkd as torch_ref  # noqa: E402
from tests import torch_utils  # noqa: E402


def _template(model, size=32):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


def test_module_path_rule():
  assert convert.module_path('layer1.0.conv1') == ('layer1_0', 'conv1')
  assert convert.module_path('block1.layer.0.bn1') == ('block1', 'layer_0', 'bn1')
  assert convert.module_path('blocks.0.0.conv.3') == ('blocks_0_0', 'conv_3')
  assert convert.module_path('abfs.2.att_conv.0') == ('abfs_2', 'att_conv_0')


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys():
  t_model, _ = torch_reference.build('resnet8', num_classes=100)
  sd = dict(t_model.state_dict())
  del sd['layer1.0.conv1.weight']
  sd['extra.weight'] = torch.zeros(3)
  with pytest.raises(convert.StateDictMismatchError) as e:
    convert.torch_to_flax(sd, _template(create_model('resnet8', num_classes=10)))
  msg = str(e.value)
  assert 'Missing from the file (1)' in msg and 'params/layer1_0/conv1/kernel' in msg
  assert 'Unexpected in the file (1)' in msg and 'extra.weight' in msg
  assert 'Wrong shape' in msg and 'fc.weight' in msg and '(100, 64)' in msg


def test_a_teacher_of_another_architecture_is_rejected():
  t_model, _ = torch_reference.build('resnet20', num_classes=100)
  with pytest.raises(convert.StateDictMismatchError, match='Unexpected in the file'):
    convert.torch_to_flax(t_model.state_dict(), _template(create_model('resnet8')))


def test_wrappers_and_dataparallel_prefix_and_pth_file(tmp_path):
  t_model, _ = torch_reference.build('resnet8', num_classes=100)
  torch_utils.randomize(t_model, 3)
  sd = t_model.state_dict()
  wrapped = {'epoch': 240, 'model': {f'module.{k}': v for k, v in sd.items()}}
  path = tmp_path / 'ckpt_epoch_240.pth'
  torch.save(wrapped, path)
  loaded = convert.load_torch_file(path)
  assert set(loaded) == set(sd)
  variables = convert.torch_to_flax(loaded, _template(create_model('resnet8')))
  np.testing.assert_array_equal(variables['params']['layer1_0']['conv1']['kernel'],
                                sd['layer1.0.conv1.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['bn1']['var'],
                                sd['bn1.running_var'].numpy())
  with pytest.raises(FileNotFoundError):
    convert.load_torch_file(tmp_path / 'missing.pth')
  with pytest.raises(convert.StateDictMismatchError, match='Could not find a state_dict'):
    convert.unwrap_state_dict({'epoch': 3, 'optimizer': {'lr': 0.1}})


@pytest.mark.parametrize('name', ['ShuffleV1', 'MobileNetV2'])  # grouped and depthwise convs
def test_flax_to_torch_round_trip(name):
  t_model, _ = torch_reference.build(name, num_classes=100)
  torch_utils.randomize(t_model, 1)
  sd = {k: v for k, v in t_model.state_dict().items() if not k.endswith('num_batches_tracked')}
  variables = convert.torch_to_flax(sd, _template(create_model(name)))
  back = convert.flax_to_torch(variables)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


class _AuthorsStudent(torch.nn.Module):
  """A CRD-layout backbone returning what the authors' ReviewKD wrapper expects."""

  def __init__(self, name):
    super().__init__()
    self.net, self._forward = torch_reference.build(name, num_classes=100)

  def state_dict(self, *args, **kwargs):  # keys without the `net.` level, as theirs
    return self.net.state_dict(*args, **kwargs)

  def forward(self, x):
    logits, f = self._forward(self.net, x)
    return [*f['stages'], f['pooled'][:, :, None, None]], logits


def test_authors_reviewkd_checkpoint_loads_and_matches():
  """`student.*` + `abfs.N.*` keys (resnet20 student, resnet56 teacher shapes) load and agree."""
  student, _ = reviewkd.build_reviewkd('resnet20', 'resnet56', num_classes=100, image_size=32)
  t_wrapper = torch_ref.ReviewKD(_AuthorsStudent('resnet20'), in_channels=[16, 32, 64, 64],
                                 out_channels=[16, 32, 64, 64], shapes=[1, 8, 16, 32],
                                 out_shapes=[1, 8, 16, 32], mid_channel=64)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
  torch_utils.randomize(t_wrapper, 0, calibrate=x_nchw).eval()
  sd = {k.replace('student.net.', 'student.'): v for k, v in t_wrapper.state_dict().items()}
  assert any(k.startswith('abfs.3.') for k in sd)
  variables = convert.torch_to_flax(sd, _template(student))
  with torch.no_grad():
    t_fused, t_logits = t_wrapper(x_nchw)
    exact_fused, exact_logits = copy.deepcopy(t_wrapper).double()(x_nchw.double())
  logits, _, fused = student.apply(variables, jnp.asarray(x), train=False)
  torch_utils.assert_as_accurate('logits', logits, t_logits, exact_logits)
  for i, (ours, theirs, exact) in enumerate(zip(fused, t_fused, exact_fused)):
    torch_utils.assert_as_accurate(f'fused[{i}]', ours, theirs, exact)


def test_backbone_weights_into_a_reviewkd_student_with_prefix_and_non_strict():
  """A plain backbone state_dict fills `student/...`; the ABFs keep their init (strict=False)."""
  student, _ = reviewkd.build_reviewkd('resnet8', 'resnet20', num_classes=100, image_size=32)
  init = student.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  t_model, _ = torch_reference.build('resnet8', num_classes=100)
  with pytest.raises(convert.StateDictMismatchError, match='abfs_0'):
    convert.torch_to_flax(t_model.state_dict(), init, prefix='student')
  v = convert.torch_to_flax(t_model.state_dict(), init, prefix='student', strict=False)
  np.testing.assert_array_equal(v['params']['student']['fc']['bias'],
                                t_model.state_dict()['fc.bias'].numpy())
  np.testing.assert_array_equal(v['params']['abfs_0']['conv1_0']['kernel'],
                                init['params']['abfs_0']['conv1_0']['kernel'])
