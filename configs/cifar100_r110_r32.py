"""ReviewKD on CIFAR-100, resnet110 -> resnet32.

Table 1: teacher 74.31, student 71.14, ReviewKD 73.89.

  python main.py --config=configs/cifar100_r110_r32.py --workdir=runs/r110_r32 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:resnet110`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 resnet110.
Lambda from the authors' script/reviewKD.sh.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for resnet110 -> resnet32."""
  return cifar100_baseline.reviewkd_config(teacher='resnet110', student='resnet32',
                                           reviewkd_weight=1.0)
