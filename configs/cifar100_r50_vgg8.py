"""ReviewKD on CIFAR-100, ResNet50 -> vgg8: row 'r50_vgg8' of configs/pairs.py.

Cross-architecture pair. Lambda and every other number of the pair are its row.

  python main.py --config=configs/cifar100_r50_vgg8.py --workdir=runs/r50_vgg8 \
      --config.teacher_weights=TEACHER

TEACHER: the workdir of `configs/cifar100_baseline.py:model=ResNet50`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of a CIFAR-100 ResNet50.
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for ResNet50 -> vgg8."""
  return pairs.reviewkd_config('r50_vgg8')
