"""A detector trained alone on the offline digit scenes (real handwritten digits pasted on
96x96 canvases; reviewkd_jax/detection/scenes.py), in minutes on a CPU.

  python main.py --config=configs/digit_scenes_detector.py --workdir=/tmp/digit_detector

Mask R-CNN R18-FPN from random weights at 128x128 with smaller RPN/RoI budgets; the
classification recipe's ideas at toy scale. Evaluated with COCO box and mask AP on 256
held-out scenes built from digits never seen in training.
"""
import ml_collections

from configs import detection_default


def get_config() -> ml_collections.ConfigDict:
  config = detection_default.get_config()
  config.dataset = 'digit_scenes'
  config.train_min_sizes = (96, 112, 128)
  config.train_max_size = 128
  config.test_min_size = 128
  config.test_max_size = 128
  config.pad_size = (128, 128)
  config.max_boxes = 4
  config.random_flip = False           # a mirrored digit is not a digit
  config.shuffle_buffer = 0
  config.batch_size = 16
  config.eval_batch_size = 16
  config.backbone = 'resnet18'
  config.mask = True
  config.fpn_channels = 64             # toy widths: a CPU-sized detector
  config.box_head_dim = 256
  config.mask_head_dim = 64
  config.freeze_at = 0                 # random weights: nothing to keep frozen
  config.rpn_pre_nms_topk = (500, 300)
  config.rpn_post_nms_topk = (200, 100)
  config.roi_batch_size_per_image = 128
  config.learning_rate = 0.02
  config.base_batch_size = 16
  config.max_steps = 1500
  config.lr_steps = (1000, 1300)
  config.warmup_steps = 100
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.eval_every_steps = 500
  return config
