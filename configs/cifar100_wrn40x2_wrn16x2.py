"""ReviewKD on CIFAR-100, wrn_40_2 -> wrn_16_2.

Table 1: teacher 75.61, student 73.26, ReviewKD 76.12.

  python main.py --config=configs/cifar100_wrn40x2_wrn16x2.py --workdir=runs/wrn40x2_wrn16x2 \
      --config.teacher_checkpoint=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:wrn_40_2`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 wrn_40_2.
Lambda from the authors' script/reviewKD.sh.
"""
from configs import cifar100_baseline


def get_config():
  """Returns the authors' recipe for wrn_40_2 -> wrn_16_2."""
  return cifar100_baseline.reviewkd_config(teacher='wrn_40_2', student='wrn_16_2',
                                           reviewkd_weight=5.0)
