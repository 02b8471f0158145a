"""PyTorch references for CRD's CIFAR MobileNetV2 (`mobile_half`), ShuffleV1 and ShuffleV2.

Written from the published architectures with the module names of HobbitLong/RepDistiller
(`models/mobilenetv2.py`, `ShuffleNetv1.py`, `ShuffleNetv2.py`), so their state_dicts have
the keys of CRD checkpoints, and with CRD's forward passes and inits. Each `forward` returns
`(logits, {'stem', 'stages', 'preact', 'pooled'})` in NCHW, the layout of our Flax features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
  """Returns CRD's ShuffleBlock output: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> back."""
  n, c, h, w = x.size()
  return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _features(stem, stages, preact, pooled) -> dict:
  return {'stem': stem, 'stages': stages, 'preact': preact, 'pooled': pooled}


# ---------------------------------------------------------------- ShuffleNetV1 (CRD ShuffleV1)

class V1Bottleneck(nn.Module):
  """ShuffleNetV1 unit; `forward` returns `(relu(preact), preact)`."""

  def __init__(self, in_planes, out_planes, stride, groups):
    super().__init__()
    self.stride = stride
    mid = int(out_planes / 4)
    self.g1 = 1 if in_planes == 24 else groups  # CRD's first-layer rule
    self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g1, bias=False)
    self.bn1 = nn.BatchNorm2d(mid)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else (
        nn.Sequential())

  def forward(self, x):
    out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    res = self.shortcut(x)
    preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
    return F.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """CRD's `ShuffleV1`: out planes 240/480/960, blocks 4/8/4, groups 3."""

  def __init__(self, num_classes=100, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
               groups=3):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    in_planes = 24
    for s, (planes, blocks) in enumerate(zip(out_planes, num_blocks)):
      layer = []
      for i in range(blocks):
        layer.append(V1Bottleneck(in_planes, planes - (in_planes if i == 0 else 0),
                                  2 if i == 0 else 1, groups))
        in_planes = planes
      setattr(self, f'layer{s + 1}', nn.Sequential(*layer))
    self.linear = nn.Linear(out_planes[-1], num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    stem, stages, preacts = out, [], []
    for layer in (self.layer1, self.layer2, self.layer3):
      for block in layer:
        out, preact = block(out)
      stages.append(out)
      preacts.append(preact)
    pooled = F.avg_pool2d(out, 4).flatten(1)
    return self.linear(pooled), _features(stem, stages, preacts, pooled)


# ---------------------------------------------------------------- ShuffleNetV2 (CRD ShuffleV2)

class V2BasicBlock(nn.Module):
  """Stride-1 unit; `forward` returns `(shuffled out, preact)`, preact unshuffled as in CRD."""

  def __init__(self, in_channels, split_ratio=0.5):
    super().__init__()
    self.ratio = split_ratio
    c = int(in_channels * split_ratio)
    self.conv1 = nn.Conv2d(c, c, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, c, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(c)

  def forward(self, x):
    c = int(x.size(1) * self.ratio)
    x1, x2 = x[:, :c], x[:, c:]
    out = F.relu(self.bn1(self.conv1(x2)))
    out = self.bn2(self.conv2(out))
    pre = self.bn3(self.conv3(out))
    out = shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
    return out, torch.cat([x1, pre], 1)


class V2DownBlock(nn.Module):
  """Stride-2 unit: left dw3x3 -> 1x1, right 1x1 -> dw3x3 -> 1x1, concat, shuffle."""

  def __init__(self, in_channels, out_channels):
    super().__init__()
    mid = out_channels // 2
    self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1,
                           groups=in_channels, bias=False)
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = F.relu(self.bn3(self.conv3(x)))
    right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
    return shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
  """CRD's `ShuffleV2` (net_size 1): channels 116/232/464 then 1024, blocks 3/7/3."""

  def __init__(self, num_classes=100, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    in_channels = 24
    for s, (channels, blocks) in enumerate(zip(out_channels[:3], num_blocks)):
      layer = [V2DownBlock(in_channels, channels)]
      layer += [V2BasicBlock(channels) for _ in range(blocks)]
      in_channels = channels
      setattr(self, f'layer{s + 1}', nn.Sequential(*layer))
    self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels[3])
    self.linear = nn.Linear(out_channels[3], num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    stem, stages, preacts = out, [], []
    for layer in (self.layer1, self.layer2, self.layer3):
      out = layer[0](out)
      for block in layer[1:]:
        out, preact = block(out)
      stages.append(out)
      preacts.append(preact)
    out = F.relu(self.bn2(self.conv2(out)))
    pooled = F.avg_pool2d(out, 4).flatten(1)
    return self.linear(pooled), _features(stem, stages, preacts, pooled)


# ---------------------------------------------------------------- MobileNetV2 (CRD mobile_half)

class InvertedResidual(nn.Module):
  """CRD's block: pw expand, dw 3x3, pw linear, in one `conv` Sequential (indices 0..7)."""

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    self.use_res_connect = stride == 1 and inp == oup
    hidden = inp * expand_ratio
    self.conv = nn.Sequential(
        nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  """CRD's MobileNetV2(T, width_mult) for 32x32 inputs; `mobile_half` is T=6, width 0.5."""
  SETTING = [[1, 16, 1, 1], [None, 24, 2, 1], [None, 32, 3, 2], [None, 64, 4, 2],
             [None, 96, 3, 1], [None, 160, 3, 2], [None, 320, 1, 1]]  # t (None: T), c, n, s

  def __init__(self, num_classes=100, T=6, width_mult=0.5):
    super().__init__()
    cin = int(32 * width_mult)
    self.conv1 = nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin),
                               nn.ReLU())
    self.blocks = nn.ModuleList()
    for t, c, n, s in self.SETTING:
      cout = int(c * width_mult)
      group = []
      for stride in [s] + [1] * (n - 1):
        group.append(InvertedResidual(cin, cout, stride, T if t is None else t))
        cin = cout
      self.blocks.append(nn.Sequential(*group))
    self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = nn.Sequential(nn.Conv2d(cin, self.last_channel, 1, 1, 0, bias=False),
                               nn.BatchNorm2d(self.last_channel), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
    self.avgpool = nn.AvgPool2d(2, ceil_mode=True)  # input_size // 16 for 32 px
    self._initialize_weights()

  def _initialize_weights(self):
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2. / n))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.weight.data.normal_(0, 0.01)
        m.bias.data.zero_()

  def forward(self, x):
    out = self.conv1(x)
    stem, stages = out, []
    for i, group in enumerate(self.blocks):
      out = group(out)
      if i in (1, 2, 4, 6):
        stages.append(out)
    pooled = self.avgpool(self.conv2(out)).flatten(1)
    # CRD returns the same f1..f4 whether or not `preact` is asked for.
    return self.classifier(pooled), _features(stem, stages, list(stages), pooled)


REFERENCES = {'MobileNetV2': MobileNetV2, 'ShuffleV1': ShuffleNetV1, 'ShuffleV2': ShuffleNetV2}
