"""A CIFAR-100 network trained alone: the teachers and the student baselines.

  python main.py --config=configs/cifar100_baseline.py:resnet56 --workdir=/tmp/cifar100_resnet56

The same recipe as the distillation runs (the authors' train.py without a teacher); its
workdir is what `--config.teacher_checkpoint` of a ReviewKD config takes. The pair configs
(`cifar100_<teacher>_<student>.py`) are `reviewkd_config` of their two networks.
"""
import ml_collections

from configs import default

# The authors' train.py sets lr 0.02 for ShuffleNet and MobileNet, 0.1 for the others.
LEARNING_RATES = {
    'resnet56': 0.1, 'resnet110': 0.1, 'resnet32x4': 0.1, 'wrn_40_2': 0.1, 'vgg13': 0.1,
    'ResNet50': 0.1, 'resnet20': 0.1, 'resnet32': 0.1, 'resnet8x4': 0.1, 'wrn_16_2': 0.1,
    'wrn_40_1': 0.1, 'vgg8': 0.1, 'ShuffleV1': 0.02, 'ShuffleV2': 0.02, 'MobileNetV2': 0.02,
}


def get_config(model: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe that trains `model` alone on CIFAR-100."""
  if model not in LEARNING_RATES:
    raise ValueError(f'Name the network after the file: configs/cifar100_baseline.py:NAME with '
                     f'NAME one of {", ".join(LEARNING_RATES)}; got {model!r}.')
  config = default.get_config()
  config.model = model
  config.learning_rate = LEARNING_RATES[model]
  return config


def reviewkd_config(*, teacher: str, student: str,
                    reviewkd_weight: float) -> ml_collections.ConfigDict:
  """Returns ReviewKD for a pair: the student's recipe plus the authors' distillation fields."""
  config = get_config(student)
  config.method = 'reviewkd'
  config.teacher = teacher
  config.teacher_bn_mode = 'batch_stats'  # the authors' script never calls teacher.eval()
  config.reviewkd_weight = reviewkd_weight  # lambda, warmed up over the first 20 epochs
  return config
