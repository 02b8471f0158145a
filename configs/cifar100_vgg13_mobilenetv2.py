"""ReviewKD on CIFAR-100, vgg13 -> MobileNetV2.

Cross-architecture pair.

  python main.py --config=configs/cifar100_vgg13_mobilenetv2.py --workdir=runs/vgg13_mobilenetv2 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:vgg13`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 vgg13.
Lambda: not in the authors' scripts; the supplementary's CIFAR value.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for vgg13 -> MobileNetV2."""
  return cifar100_baseline.reviewkd_config(teacher='vgg13', student='MobileNetV2',
                                           reviewkd_weight=5.0)
