"""A CIFAR-100 network trained alone: the teachers and the student baselines.

  python main.py --config=configs/cifar100_baseline.py:model=resnet56 \
      --workdir=/tmp/cifar100_resnet56

MODEL: any network of LEARNING_RATES (a wrong one lists them). The same recipe as the
distillation runs (the authors' train.py without a teacher); its workdir is what
`--config.teacher_weights` of a ReviewKD config takes. The pair configs
(`cifar100_<teacher>_<student>.py`) are this recipe of the student plus their row of
configs/pairs.py.
"""
import ml_collections

from configs import args
from configs import default

# The one table of per-network learning rates. The authors' train.py sets lr 0.02 for
# ShuffleNet and MobileNet, 0.1 for the others.
LEARNING_RATES = {
    'resnet56': 0.1, 'resnet110': 0.1, 'resnet32x4': 0.1, 'wrn_40_2': 0.1, 'vgg13': 0.1,
    'ResNet50': 0.1, 'resnet20': 0.1, 'resnet32': 0.1, 'resnet8x4': 0.1, 'wrn_16_2': 0.1,
    'wrn_40_1': 0.1, 'vgg8': 0.1, 'ShuffleV1': 0.02, 'ShuffleV2': 0.02, 'MobileNetV2': 0.02,
}
ARGS = {'model': tuple(LEARNING_RATES)}


def recipe(model: str) -> ml_collections.ConfigDict:
  """Returns the recipe that trains `model` (a key of LEARNING_RATES) alone on CIFAR-100."""
  config = default.get_config()
  config.model = model
  config.learning_rate = LEARNING_RATES[model]
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe of `arg`, 'model=NAME', e.g. `get_config('model=resnet56')`."""
  return recipe(args.parse(arg, ARGS, 'configs/cifar100_baseline.py')['model'])
