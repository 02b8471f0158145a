"""ReviewKD on ImageNet, resnet50 -> mobilenet_v1.

Paper top-1: teacher 76.16, student 68.87, ReviewKD 72.56.

  python main.py --config=configs/imagenet_r50_mobilenet.py --workdir=gs://BUCKET/r50_mobilenet \
      --config.data_dir=gs://BUCKET/tfds --config.teacher_checkpoint=TEACHER.pth

TEACHER.pth: torchvision's ImageNet resnet50 weights, the authors' teacher (the file that
`torchvision.models.resnet50(weights='IMAGENET1K_V1')` downloads to ~/.cache/torch/hub).
"""
from configs import imagenet_baseline


def get_config():
  """Returns the authors' recipe for resnet50 -> mobilenet_v1."""
  return imagenet_baseline.reviewkd_config(teacher='resnet50', student='mobilenet_v1',
                                           reviewkd_weight=8.0, mid_channels=256,
                                           # MobileNet pre-ReLU (F.relu), ResNet50
                                           # post-ReLU (in-place ReLU)
                                           student_features='preact',
                                           teacher_features='stages')
