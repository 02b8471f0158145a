"""ReviewKD on CIFAR-100, ResNet50 -> MobileNetV2: row 'r50_mobilenetv2' of configs/pairs.py.

Cross-architecture pair (paper Table 2). Lambda, the published top-1 and every other number
of the pair are its row.

  python main.py --config=configs/cifar100_r50_mobilenetv2.py --workdir=runs/r50_mobilenetv2 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=ResNet50`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 ResNet50.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for ResNet50 -> MobileNetV2."""
  return pairs.reviewkd_config('r50_mobilenetv2')
