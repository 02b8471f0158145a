"""CRD's CIFAR ResNet50 (RepDistiller `models/resnetv2.py`), the VGG8/MobileNetV2 teacher.

torchvision's Bottleneck ResNet50 with a CIFAR stem: one 3x3 stride-1 conv and no max pool,
so the four stages (256, 512, 1024, 2048 channels) run at 32, 16, 8 and 4 px on CIFAR. The
shortcut projection is named `shortcut` and the classifier `linear`, as in CRD's checkpoints.
`preact` is each stage's last residual sum before its ReLU.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from reviewkd_jax.models.cifar_resnet import BOTTLENECK, CifarResNet
from reviewkd_jax.models.registry import register_model


@register_model('ResNet50')
def resnet50_cifar(num_classes: int = 100, dtype=jnp.float32, **kw) -> nn.Module:
  """Returns CRD's CIFAR ResNet50 (Bottlenecks 3-4-6-3, 3x3 stem)."""
  return CifarResNet((3, 4, 6, 3), (64, 128, 256, 512), 64, BOTTLENECK,
                     num_classes=num_classes, shortcut_name='shortcut',
                     classifier_name='linear', dtype=dtype, **kw)
