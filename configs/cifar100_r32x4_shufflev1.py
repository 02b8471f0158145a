"""ReviewKD on CIFAR-100, resnet32x4 -> ShuffleV1.

Table 2: ReviewKD 77.45.

  python main.py --config=configs/cifar100_r32x4_shufflev1.py --workdir=runs/r32x4_shufflev1 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:resnet32x4`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 resnet32x4.
Lambda from the authors' script/reviewKD.sh.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for resnet32x4 -> ShuffleV1."""
  return cifar100_baseline.reviewkd_config(teacher='resnet32x4', student='ShuffleV1',
                                           reviewkd_weight=5.0)
