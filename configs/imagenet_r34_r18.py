"""ReviewKD on ImageNet, resnet34 -> resnet18.

Paper top-1: teacher 73.31, student 69.75, ReviewKD 71.61.

  python main.py --config=configs/imagenet_r34_r18.py --workdir=gs://BUCKET/r34_r18 \
      --config.data_dir=gs://BUCKET/tfds --config.teacher_checkpoint=TEACHER.pth

TEACHER.pth: torchvision's ImageNet resnet34 weights, the authors' teacher (the file that
`torchvision.models.resnet34(weights='IMAGENET1K_V1')` downloads to ~/.cache/torch/hub).
"""
from configs import imagenet_baseline


def get_config():
  """Returns the authors' recipe for resnet34 -> resnet18."""
  return imagenet_baseline.reviewkd_config(teacher='resnet34', student='resnet18',
                                           reviewkd_weight=1.0,
                                           # post-ReLU on both sides (in-place ReLU)
                                           student_features='stages',
                                           teacher_features='stages')
