"""ReviewKD on CIFAR-100, vgg13 -> MobileNetV2: row 'vgg13_mobilenetv2' of configs/pairs.py.

Cross-architecture pair. Lambda and every other number of the pair are its row.

  python main.py --config=configs/cifar100_vgg13_mobilenetv2.py --workdir=runs/vgg13_mobilenetv2 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=vgg13`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 vgg13.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for vgg13 -> MobileNetV2."""
  return pairs.reviewkd_config('vgg13_mobilenetv2')
