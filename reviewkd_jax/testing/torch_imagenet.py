"""PyTorch references for the ImageNet backbones: feature extraction around torchvision's
ResNets, and the authors' MobileNet (ReviewKD `ImageNet/models/mobilenet.py`) rebuilt with
their layer names. Features come back in our layout (`reviewkd_jax.models`), NCHW."""
from __future__ import annotations

import torch

nn = torch.nn


def _residual_sum(block, x):
  """Returns a torchvision BasicBlock/Bottleneck's branch + shortcut, before its final ReLU."""
  out, i = x, 1
  while hasattr(block, f'conv{i}'):
    if i > 1:
      out = torch.relu(out)
    out = getattr(block, f'bn{i}')(getattr(block, f'conv{i}')(out))
    i += 1
  identity = x if block.downsample is None else block.downsample(x)
  return out + identity


def resnet_forward(model, x):
  """Returns (logits, features) of a torchvision ResNet, logits from its own forward."""
  logits = model(x)
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  feats = {'stem': x, 'stages': [], 'preact': []}
  for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
    for block in layer[:-1]:
      x = block(x)
    feats['preact'].append(_residual_sum(layer[-1], x))
    x = layer[-1](x)  # torchvision's own block, so `stages` does not rely on _residual_sum
    feats['stages'].append(x)
  feats['pooled'] = torch.flatten(model.avgpool(x), 1)
  return logits, feats


class AuthorsMobileNet(nn.Module):
  """The authors' ImageNet MobileNet: `model` = conv_bn stem, 13 conv_dw blocks, AvgPool2d(7)."""
  # (in, out, stride) of model.1 ... model.13, as in the authors' file.
  DW = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
        (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
        (512, 1024, 2), (1024, 1024, 1))
  FEATURE_BLOCKS = (3, 5, 11, 13)  # the `get_bn_before_relu` / `extract_feature` taps

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                         nn.ReLU(inplace=True))
    blocks = [
        nn.Sequential(nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i),
                      nn.ReLU(inplace=True), nn.Conv2d(i, o, 1, 1, 0, bias=False),
                      nn.BatchNorm2d(o), nn.ReLU(inplace=True)) for i, o, s in self.DW
    ]
    self.model = nn.Sequential(stem, *blocks, nn.AvgPool2d(7))
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    return self.fc(self.model(x).view(-1, 1024))


def mobilenet_forward(model, x):
  """Returns (logits, features) of `AuthorsMobileNet`; `preact` is each tap's last BN output."""
  logits = model(x)
  x = model.model[0](x)
  feats = {'stem': x, 'stages': [], 'preact': []}
  for i in range(1, 14):
    if i in model.FEATURE_BLOCKS:
      pre = model.model[i][:-1](x)
      x = model.model[i][-1](pre.clone())  # the ReLU is in place
      feats['preact'].append(pre)
      feats['stages'].append(x)
    else:
      x = model.model[i](x)
  feats['pooled'] = torch.flatten(model.model[14](x), 1)
  return logits, feats


# --- The authors' ImageNet feature extraction, as their code computes it --------------------

class AuthorsImageNetResNet(nn.Module):
  """A torchvision ResNet's layers run the way the authors' ImageNet `ResNet` runs with
  `is_feat=True`; `forward(x)` returns `([x1, x2, x3, x4, x5], logits)`.

  Their file is torchvision's ResNet with two changes: each stage's last block skips its final
  ReLU (`is_last`), and `_forward_impl` keeps that block's output as the stage's feature and
  then feeds the next stage `self.relu(x1)`, where `self.relu` is `nn.ReLU(inplace=True)`.
  The in-place ReLU overwrites the kept tensor, so every returned feature is post-ReLU even
  though the code reads as pre-ReLU. This class keeps that aliasing (torchvision's own
  `self.relu` is the same in-place module) instead of reasoning about it. The modules are
  torchvision's, under their names, so `state_dict()` keys are torchvision's.
  """

  def __init__(self, net):
    super().__init__()
    for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4',
                 'avgpool', 'fc'):
      setattr(self, name, getattr(net, name))
    assert isinstance(self.relu, nn.ReLU) and self.relu.inplace

  @staticmethod
  def _stage(layer, x):
    for block in layer[:-1]:
      x = block(x)
    return _residual_sum(layer[-1], x)  # the authors' `is_last` block: no final ReLU

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x1 = self._stage(self.layer1, x)
    x2 = self.relu(x1)                   # in place: x1 is now post-ReLU too
    x2 = self._stage(self.layer2, x2)
    x3 = self.relu(x2)
    x3 = self._stage(self.layer3, x3)
    x4 = self.relu(x3)
    x4 = self._stage(self.layer4, x4)
    x = self.relu(x4)
    x5 = self.avgpool(x)
    return [x1, x2, x3, x4, x5], self.fc(torch.flatten(x5, 1))


class AuthorsMobileNetFeatures(AuthorsMobileNet):
  """`AuthorsMobileNet` whose `forward` is the authors' `extract_feature(x, preReLU=True)`:
  returns `([feat1..feat4, pooled], logits)`. Their taps are the blocks' last BN outputs, and
  the ReLU between taps is the functional, not-in-place `F.relu`: the features stay pre-ReLU.
  """

  def forward(self, x):
    relu, m = torch.nn.functional.relu, self.model
    feat1 = m[3][:-1](m[0:3](x))
    feat2 = m[5][:-1](m[4:5](relu(feat1)))
    feat3 = m[11][:-1](m[6:11](relu(feat2)))
    feat4 = m[13][:-1](m[12:13](relu(feat3)))
    feat5 = m[14](relu(feat4))
    return [feat1, feat2, feat3, feat4, feat5], self.fc(feat5.view(-1, 1024))
