"""Backbones with intermediate features.

Every model is a linen module called as `model.apply(variables, x, train=...)` (`train` is
keyword-only and required) on NHWC input and returns a `ModelOutput(logits, features)`, a
NamedTuple (so `logits, features = ...` works too), where `features` is a dict:

- `stem`: the output of the stem (first conv block), after activation.
- `stages`: list of per-stage outputs, shallow to deep: after activation, except WRN (raw
  residual sums) and MobileNetV2 (linear bottleneck outputs), as the KD codebases take them.
- `preact`: the same stages before the stage's last activation (family rules in docs/reviewkd.md).
- `pooled`: (N, C) globally pooled embedding that feeds the classifier.
"""
from reviewkd_jax.models.layers import ModelOutput
from reviewkd_jax.models.registry import create_model, list_models, register_model

# Importing the family modules registers their models.
from reviewkd_jax.models import cifar_resnet  # noqa: F401,E402
from reviewkd_jax.models import wrn  # noqa: F401,E402
from reviewkd_jax.models import vgg  # noqa: F401,E402
from reviewkd_jax.models import cifar_resnet_v2  # noqa: F401,E402
from reviewkd_jax.models import mobilenetv2  # noqa: F401,E402
from reviewkd_jax.models import shufflenetv1  # noqa: F401,E402
from reviewkd_jax.models import shufflenetv2  # noqa: F401,E402
from reviewkd_jax.models import imagenet_resnet  # noqa: F401,E402
from reviewkd_jax.models import mobilenetv1  # noqa: F401,E402

__all__ = ['ModelOutput', 'create_model', 'list_models', 'register_model']
