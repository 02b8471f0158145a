"""ReviewKD on CIFAR-100, wrn_40_2 -> wrn_40_1: row 'wrn40x2_wrn40x1' of configs/pairs.py.

Paper Table 1. Lambda, the published top-1 and every other number of the pair are its row.

  python main.py --config=configs/cifar100_wrn40x2_wrn40x1.py --workdir=runs/wrn40x2_wrn40x1 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=wrn_40_2`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 wrn_40_2.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for wrn_40_2 -> wrn_40_1."""
  return pairs.reviewkd_config('wrn40x2_wrn40x1')
