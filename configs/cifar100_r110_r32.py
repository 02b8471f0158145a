"""ReviewKD on CIFAR-100, resnet110 -> resnet32: row 'r110_r32' of configs/pairs.py.

Paper Table 1. Lambda, the published top-1 and every other number of the pair are its row.

  python main.py --config=configs/cifar100_r110_r32.py --workdir=runs/r110_r32 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=resnet110`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 resnet110.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for resnet110 -> resnet32."""
  return pairs.reviewkd_config('r110_r32')
