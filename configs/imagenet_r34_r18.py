"""ReviewKD on ImageNet, resnet34 -> resnet18: row 'r34_r18' of configs/pairs.py.

Paper Table 3. Lambda, the feature kinds, the published top-1 and every other number of the
pair are its row.

  python main.py --config=configs/imagenet_r34_r18.py --workdir=gs://BUCKET/r34_r18 \
      --config.data_dir=gs://BUCKET/tfds --config.teacher_weights=TEACHER.pth

TEACHER.pth: torchvision's ImageNet resnet34 weights, the authors' teacher (the file that
`torchvision.models.resnet34(weights='IMAGENET1K_V1')` downloads to ~/.cache/torch/hub).
"""
from configs import pairs


def get_config():
  """Returns the authors' recipe for resnet34 -> resnet18."""
  return pairs.reviewkd_config('r34_r18')
