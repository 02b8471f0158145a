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
