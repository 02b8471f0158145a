"""The authors' ReviewKD pieces in PyTorch (ABF, the student wrapper, `hcl`, and the detectors'
FPN version `DetectionReviewKD`), written from their published code: the reference our parity
tests and the PyTorch benchmark row use."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class ABF(nn.Module):
  """The authors' attention-based fusion block (`conv1`, `att_conv`, `conv2`)."""

  def __init__(self, in_channel, mid_channel, out_channel, fuse):
    super().__init__()
    self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False),
                               nn.BatchNorm2d(mid_channel))
    self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(out_channel))
    self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, 1), nn.Sigmoid()) if fuse \
        else None
    nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
    nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

  def forward(self, x, y=None, shape=None, out_shape=None):
    n, _, h, w = x.shape
    x = self.conv1(x)
    if self.att_conv is not None:
      y = F.interpolate(y, (shape, shape), mode='nearest')
      z = self.att_conv(torch.cat([x, y], dim=1))
      x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
      x = F.interpolate(x, (out_shape, out_shape), mode='nearest')
    return self.conv2(x), x


class ReviewKD(nn.Module):
  """The authors' student wrapper: `student(x)` must return (feature list incl. pooled, logits)."""

  def __init__(self, student, in_channels, out_channels, shapes, out_shapes, mid_channel):
    super().__init__()
    self.student, self.shapes, self.out_shapes = student, shapes, out_shapes
    abfs = nn.ModuleList()
    for idx, c in enumerate(in_channels):
      abfs.append(ABF(c, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
    self.abfs = abfs[::-1]

  def forward(self, x):
    feats, logit = self.student(x)
    x = feats[::-1]
    results = []
    out, res = self.abfs[0](x[0], out_shape=self.out_shapes[0])
    results.append(out)
    for f, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:],
                                        self.out_shapes[1:]):
      out, res = abf(f, res, shape, out_shape)
      results.insert(0, out)
    return results, logit


def hcl(fstudent, fteacher):
  """The authors' hierarchical context loss on NCHW tensors."""
  loss_all = 0.0
  for fs, ft in zip(fstudent, fteacher):
    h = fs.shape[2]
    loss = F.mse_loss(fs, ft, reduction='mean')
    cnt, tot = 1.0, 1.0
    for l in [4, 2, 1]:
      if l >= h:
        continue
      cnt /= 2.0
      loss += F.mse_loss(F.adaptive_avg_pool2d(fs, (l, l)), F.adaptive_avg_pool2d(ft, (l, l)),
                         reduction='mean') * cnt
      tot += cnt
    loss_all = loss_all + loss / tot
  return loss_all


class DetectionABF(ABF):
  """The authors' detection ABF (`Detection/model/kd_trans.py`): the classification ABF's
  layers; the residual is upsampled to the level's own size and there is no output resize
  (FPN levels keep their sizes)."""

  def forward(self, x, y=None):
    n, _, h, w = x.shape
    x = self.conv1(x)
    if self.att_conv is not None:
      y = F.interpolate(y, x.shape[-2:], mode='nearest')
      z = self.att_conv(torch.cat([x, y], dim=1))
      x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    return self.conv2(x), x


class DetectionReviewKD(nn.Module):
  """The authors' `kd_trans` of the detectors: one ABF per FPN level, `abfs.0` the deepest.

  `forward(levels)` takes the student's levels shallowest first (P2..P6) and returns the ABF
  outputs in that order; the loss is `hcl(outputs, teacher_levels)`.
  """

  def __init__(self, in_channels=(256,) * 5, out_channels=(256,) * 5, mid_channel=256):
    super().__init__()
    abfs = nn.ModuleList()
    for idx, c in enumerate(in_channels):
      abfs.append(DetectionABF(c, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
    self.abfs = abfs[::-1]

  def forward(self, student_features):
    x = student_features[::-1]
    results = []
    out, res = self.abfs[0](x[0])
    results.append(out)
    for f, abf in zip(x[1:], self.abfs[1:]):
      out, res = abf(f, res)
      results.insert(0, out)
    return results
