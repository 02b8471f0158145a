"""ReviewKD on ImageNet, resnet50 -> mobilenet_v1: row 'r50_mobilenet' of configs/pairs.py.

Paper Table 3. Lambda, the feature kinds, the published top-1 and every other number of the
pair are its row.

  python main.py --config=configs/imagenet_r50_mobilenet.py --workdir=gs://BUCKET/r50_mobilenet \
      --config.data_dir=gs://BUCKET/tfds --config.teacher_weights=TEACHER.pth

TEACHER.pth: torchvision's ImageNet resnet50 weights, the authors' teacher (the file that
`torchvision.models.resnet50(weights='IMAGENET1K_V1')` downloads to ~/.cache/torch/hub).
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for resnet50 -> mobilenet_v1."""
  return pairs.reviewkd_config('r50_mobilenet')
