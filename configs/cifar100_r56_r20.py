"""ReviewKD on CIFAR-100, resnet56 -> resnet20.

Table 1: teacher 72.34, student 69.06, ReviewKD 71.89.

  python main.py --config=configs/cifar100_r56_r20.py --workdir=runs/r56_r20 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:resnet56`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 resnet56.
Lambda from the authors' script/reviewKD.sh.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for resnet56 -> resnet20."""
  return cifar100_baseline.reviewkd_config(teacher='resnet56', student='resnet20',
                                           reviewkd_weight=0.6)
