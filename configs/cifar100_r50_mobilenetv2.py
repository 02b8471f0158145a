"""ReviewKD on CIFAR-100, ResNet50 -> MobileNetV2.

Table 2: ReviewKD 69.89.

  python main.py --config=configs/cifar100_r50_mobilenetv2.py --workdir=runs/r50_mobilenetv2 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:ResNet50`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 ResNet50.
Lambda: not in the authors' scripts; the supplementary's CIFAR value.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for ResNet50 -> MobileNetV2."""
  return cifar100_baseline.reviewkd_config(teacher='ResNet50', student='MobileNetV2',
                                           reviewkd_weight=5.0)
