"""ReviewKD on CIFAR-100, vgg13 -> vgg8.

Table 1: teacher 74.64, student 70.36, ReviewKD 74.84.

  python main.py --config=configs/cifar100_vgg13_vgg8.py --workdir=runs/vgg13_vgg8 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:vgg13`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 vgg13.
Lambda: not in the authors' scripts; the supplementary's CIFAR value.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for vgg13 -> vgg8."""
  return cifar100_baseline.reviewkd_config(teacher='vgg13', student='vgg8',
                                           reviewkd_weight=5.0)
