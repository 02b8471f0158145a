"""ReviewKD on CIFAR-100, resnet32x4 -> ShuffleV1: row 'r32x4_shufflev1' of configs/pairs.py.

Cross-architecture pair (paper Table 2). Lambda, the published top-1 and every other number
of the pair are its row.

  python main.py --config=configs/cifar100_r32x4_shufflev1.py --workdir=runs/r32x4_shufflev1 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=resnet32x4`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 resnet32x4.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for resnet32x4 -> ShuffleV1."""
  return pairs.reviewkd_config('r32x4_shufflev1')
