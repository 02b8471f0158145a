"""ReviewKD on CIFAR-100, resnet56 -> resnet20: row 'r56_r20' of configs/pairs.py.

Paper Table 1. Lambda, the published top-1 and every other number of the pair are its row.

  python main.py --config=configs/cifar100_r56_r20.py --workdir=runs/r56_r20 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=resnet56`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 resnet56.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for resnet56 -> resnet20."""
  return pairs.reviewkd_config('r56_r20')
