"""A detector of the paper's COCO tables trained alone (students) or evaluated (teachers).

  python main.py --config=configs/coco_detector.py:model=faster_rcnn_r18_fpn \
      --config.weights=resnet18-f37072fd.pth --workdir=/tmp/frcnn_r18
  python main.py --config=configs/coco_detector.py:model=faster_rcnn_r101_fpn_3x \
      --config.weights=model_final_f6e8b1.pkl --workdir=/tmp/teacher   # evaluates it

MODEL: one of MODELS. Students follow the ReviewKD authors' detection recipe (supplementary,
section 2: batch 8, lr 0.01, 180k iterations, x0.1 at 120k and 160k; Detectron2's defaults
otherwise) from ImageNet weights of torchvision (RGB, ImageNet mean/std); teachers are
Detectron2 model-zoo detectors (MSRA ResNets: BGR, pixel std 1, stride in the 1x1 conv),
evaluated with `max_steps=0`, their 3x recipe (batch 16, 270k iterations) kept for whoever
trains one. `published` holds the slides' AP numbers (box AP for Faster R-CNN, mask AP for
Mask R-CNN) of the row, as the classification configs hold theirs.
"""
import ml_collections

from configs import args
from configs import detection_default
from reviewkd_jax.detection import model as model_lib

# name: (backbone, mask, role, published {metric: value}, Detectron2 model-zoo file or the
# ImageNet weights the student starts from)
DETECTORS = {
    'faster_rcnn_r101_fpn_3x': ('resnet101', False, 'teacher',
                                {'bbox/AP': 42.04, 'bbox/AP50': 62.48, 'bbox/AP75': 45.88},
                                'COCO-Detection/faster_rcnn_R_101_FPN_3x model_final_f6e8b1.pkl'),
    'faster_rcnn_r50_fpn': ('resnet50', False, 'student',
                            {'bbox/AP': 37.93, 'bbox/AP50': 58.84, 'bbox/AP75': 41.05},
                            'torchvision resnet50 ImageNet weights'),
    'faster_rcnn_r18_fpn': ('resnet18', False, 'student',
                            {'bbox/AP': 33.26, 'bbox/AP50': 53.61, 'bbox/AP75': 35.26},
                            'torchvision resnet18 ImageNet weights'),
    'mask_rcnn_r101_fpn_3x': ('resnet101', True, 'teacher',
                              {'segm/AP': 38.63, 'segm/AP50': 60.45, 'segm/AP75': 41.28},
                              'COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x '
                              'model_final_a3ec72.pkl'),
    'mask_rcnn_r50_fpn_3x': ('resnet50', True, 'teacher',
                             {'segm/AP': 37.17, 'segm/AP50': 58.60, 'segm/AP75': 39.88},
                             'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x '
                             'model_final_f10217.pkl'),
    'mask_rcnn_r50_fpn': ('resnet50', True, 'student',
                          {'segm/AP': 35.24, 'segm/AP50': 56.32, 'segm/AP75': 37.49},
                          'torchvision resnet50 ImageNet weights'),
    'mask_rcnn_r18_fpn': ('resnet18', True, 'student',
                          {'segm/AP': 31.25, 'segm/AP50': 51.07, 'segm/AP75': 33.10},
                          'torchvision resnet18 ImageNet weights'),
    'mask_rcnn_mv2_fpn': ('mobilenet_v2', True, 'student',
                          {'segm/AP': 28.37, 'segm/AP50': 47.19, 'segm/AP75': 29.95},
                          'torchvision mobilenet_v2 ImageNet weights'),
}
ARGS = {'model': tuple(DETECTORS)}


def recipe(model: str) -> ml_collections.ConfigDict:
  """Returns the config of detector `model` (a key of DETECTORS)."""
  backbone, mask, role, published, weights = DETECTORS[model]
  config = detection_default.get_config()
  config.backbone = backbone
  config.mask = mask
  config.published = published
  config.weights_hint = weights
  if role == 'teacher':
    # Detectron2 model-zoo conventions; 3x schedule (batch 16).
    config.stride_in_1x1 = True
    config.input_format = 'BGR'
    config.pixel_mean = model_lib.MSRA_BGR_MEAN
    config.pixel_std = (1.0, 1.0, 1.0)
    config.max_steps = 270000
    config.lr_steps = (210000, 250000)
  else:
    # The ReviewKD authors' student recipe: batch 8, lr 0.01, 180k iterations.
    config.weights_source = 'imagenet'
    config.batch_size = 8
    config.base_batch_size = 8
    config.learning_rate = 0.01
    config.max_steps = 180000
    config.lr_steps = (120000, 160000)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of `arg`, 'model=NAME', e.g. `get_config('model=faster_rcnn_r18_fpn')`."""
  return recipe(args.parse(arg, ARGS, 'configs/coco_detector.py')['model'])
