"""PyTorch reference definitions of CRD's CIFAR ResNet, WRN, VGG(-BN) and ResNet50 backbones.

Written from the published architectures (RepDistiller `models/resnet.py`, `wrn.py`,
`vgg.py`, `resnetv2.py`) with the same module names, so their `state_dict`s have the layout
of CRD checkpoints. Each model's forward returns `(logits, features)` in our layout
(`stem`, `stages`, `preact`, `pooled`; NCHW tensors). Features are computed the way CRD's
forward computes them (e.g. WRN's `preact` re-applies the next block's `bn1`), which is an
independent route from the Flax models' capture of those values.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _features(stem, stages, preact, pooled) -> dict:
  return {'stem': stem, 'stages': list(stages), 'preact': list(preact), 'pooled': pooled}


# --- resnet.py (BasicBlock / Bottleneck with `downsample`) and resnetv2.py (`shortcut`) ---


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, shortcut_name):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    _add_shortcut(self, inplanes, planes * self.expansion, stride, shortcut_name)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return out + _shortcut(self, x)  # the pre-ReLU sum (CRD's `preact`)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, shortcut_name):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    _add_shortcut(self, inplanes, planes * self.expansion, stride, shortcut_name)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return out + _shortcut(self, x)


def _add_shortcut(block, inplanes, outplanes, stride, name):
  """Registers CRD's conv1x1+BN projection as `block.<name>` when the shape changes."""
  block.shortcut_name = name
  if stride != 1 or inplanes != outplanes:
    setattr(block, name, nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                                       nn.BatchNorm2d(outplanes)))


def _shortcut(block, x):
  """Returns the block's projection of `x`, or `x` when it has none."""
  proj = getattr(block, block.shortcut_name, None)
  return x if proj is None else proj(x)


class CifarResNet(nn.Module):
  """CRD's resnet.py ResNet (fc) or resnetv2.py ResNet (linear, shortcut)."""

  def __init__(self, block, stage_sizes, widths, stem_width, num_classes=100,
               shortcut_name='downsample', classifier_name='fc'):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem_width)
    inplanes = stem_width
    self.num_stages = len(stage_sizes)
    for s, (n, planes) in enumerate(zip(stage_sizes, widths)):
      blocks = []
      for b in range(n):
        blocks.append(block(inplanes, planes, 2 if s > 0 and b == 0 else 1, shortcut_name))
        inplanes = planes * block.expansion
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.classifier_name = classifier_name
    setattr(self, classifier_name, nn.Linear(inplanes, num_classes))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    stem = x
    stages, preact = [], []
    for s in range(self.num_stages):
      for blk in getattr(self, f'layer{s + 1}'):
        pre = blk(x)
        x = F.relu(pre)
      stages.append(x)
      preact.append(pre)
    pooled = F.avg_pool2d(x, x.shape[-1]).flatten(1)  # CRD: AvgPool2d(8) on 8x8 maps
    return getattr(self, self.classifier_name)(pooled), _features(stem, stages, preact,
                                                                  pooled)


def crd_resnet(depth, filters, num_classes=100):
  """Returns CRD's `ResNet(depth, filters, 'basicblock')`."""
  n = (depth - 2) // 6
  return CifarResNet(BasicBlock, (n,) * 3, filters[1:], filters[0], num_classes)


def crd_resnet50(num_classes=100):
  """Returns CRD's resnetv2.ResNet50 (CIFAR stem)."""
  return CifarResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 64, num_classes,
                     shortcut_name='shortcut', classifier_name='linear')


# --- wrn.py ---


class WideBasicBlock(nn.Module):

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = None if self.equal_in_out else nn.Conv2d(  # pylint: disable=invalid-name
        in_planes, out_planes, 1, stride, 0, bias=False)

  def forward(self, x):
    if not self.equal_in_out:
      x = self.relu1(self.bn1(x))
      out = x
    else:
      out = self.relu1(self.bn1(x))
    out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
    return (x if self.equal_in_out else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):

  def __init__(self, nb_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(nb_layers)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth, widen_factor, num_classes=100):
    super().__init__()
    ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
    self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
    self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
    self.bn1 = nn.BatchNorm2d(ch[3])
    self.relu = nn.ReLU()
    self.fc = nn.Linear(ch[3], num_classes)

  def forward(self, x):
    f0 = self.conv1(x)
    f1 = self.block1(f0)
    f2 = self.block2(f1)
    f3 = self.block3(f2)
    pooled = F.avg_pool2d(self.relu(self.bn1(f3)), 8).flatten(1)
    # CRD's `preact=True` branch: apply the BNs that follow each stage once more.
    preact = [self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)]
    return self.fc(pooled), _features(f0, [f1, f2, f3], preact, pooled)


# --- vgg.py (batch_norm=True) ---


class VGG(nn.Module):

  def __init__(self, cfg, num_classes=100):
    super().__init__()
    in_ch = 3
    for i, widths in enumerate(cfg):
      mods = []
      for w in widths:
        mods += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
      setattr(self, f'block{i}', nn.Sequential(*mods[:-1]))
    self.pool0 = nn.MaxPool2d(2, 2)
    self.pool1 = nn.MaxPool2d(2, 2)
    self.pool2 = nn.MaxPool2d(2, 2)
    self.pool3 = nn.MaxPool2d(2, 2)
    self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    h = x.shape[2]
    x = F.relu(self.block0(x))
    f0 = x
    x = self.pool0(x)
    x = self.block1(x)
    f1_pre = x
    f1 = x = F.relu(x)
    x = self.pool1(x)
    x = self.block2(x)
    f2_pre = x
    f2 = x = F.relu(x)
    x = self.pool2(x)
    x = self.block3(x)
    f3_pre = x
    f3 = x = F.relu(x)
    if h == 64:
      x = self.pool3(x)
    x = self.block4(x)
    f4_pre = x
    f4 = x = F.relu(x)
    pooled = self.pool4(x).flatten(1)
    return self.classifier(pooled), _features(f0, [f1, f2, f3, f4],
                                              [f1_pre, f2_pre, f3_pre, f4_pre], pooled)


_VGG_CFGS = {
    'vgg8': [[64], [128], [256], [512], [512]],
    'vgg11': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'vgg13': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'vgg16': [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    'vgg19': [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}

_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

# Registered name -> PyTorch constructor(num_classes).
BUILDERS = {
    **{f'resnet{d}': (lambda nc=100, d=d: crd_resnet(d, _NARROW, nc))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    'resnet8x4': lambda nc=100: crd_resnet(8, _X4, nc),
    'resnet32x4': lambda nc=100: crd_resnet(32, _X4, nc),
    **{f'wrn_{d}_{k}': (lambda nc=100, d=d, k=k: WideResNet(d, k, nc))
       for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: (lambda nc=100, cfg=cfg: VGG(cfg, nc)) for name, cfg in _VGG_CFGS.items()},
    'ResNet50': crd_resnet50,
}


def build(name: str, num_classes: int = 100) -> nn.Module:
  """Returns the PyTorch reference model registered here as `name`."""
  return BUILDERS[name](num_classes)


def forward(model: nn.Module, x: torch.Tensor):
  """Returns `(logits, features)` of a reference model (the `run_parity` forward)."""
  return model(x)
