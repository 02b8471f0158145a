"""Defaults of every detection run (Detectron2's Base-RCNN-FPN and its 1x schedule).

Each detection config file overrides a few fields; every field can be overridden on the
command line (`--config.max_steps=1000`). See docs/detection.md.
"""
import ml_collections
from ml_collections.config_dict import placeholder



def get_config() -> ml_collections.ConfigDict:
  """Returns Faster R-CNN R50-FPN on COCO 2017 with Detectron2's 1x recipe (batch 16)."""
  config = ml_collections.ConfigDict()
  config.task = 'detection'

  # Data (reviewkd_jax/detection/data.py): COCO 2017 from tfds, the offline digit scenes, or
  # your own COCO-format data ('coco_json', docs/custom.md).
  config.dataset = 'coco/2017'         # 'coco/2017' | 'digit_scenes' | 'coco_json'
  config.data_dir = ''                 # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.annotations_dir = ''          # instances_{train,val}2017.json (masks, evaluation)
  config.train_annotations = ''        # 'coco_json': the training split's instances json,
  config.train_images = ''             # the folder its file_names are in,
  config.eval_annotations = ''         # the evaluation split's json
  config.eval_images = ''              # and images ('' = train_images)
  config.train_min_sizes = (640, 672, 704, 736, 768, 800)  # shorter side, drawn per image
  config.train_max_size = 1333
  config.test_min_size = 800
  config.test_max_size = 1333
  config.pad_size = (1344, 1344)       # static padded size (a multiple of 32)
  config.max_boxes = 100               # ground-truth boxes kept per image
  config.random_flip = True
  config.batch_size = 16               # global images per step
  config.eval_batch_size = 8
  config.train_subset = 0              # > 0: the first N training images only
  config.eval_subset = 0               # > 0: the first N evaluation images only
  config.shuffle_buffer = 1024
  config.prefetch_batches = 2

  # The detector (reviewkd_jax/detection/model.py).
  config.backbone = 'resnet50'         # resnet18 | resnet34 | resnet50 | resnet101 | mobilenet_v2
  config.mask = False                  # Mask R-CNN (True) or Faster R-CNN
  config.convention = 'detectron2'     # 'detectron2' | 'torchvision' (RoIAlign, anchors, losses)
  # The input convention of the weights; unset (None): the one `config.weights` implies
  # (Detectron2 model-zoo R50/R101: BGR, MSRA mean, std 1, stride_in_1x1; torchvision and
  # ImageNet files: RGB, ImageNet mean/std), torchvision's without weights.
  config.stride_in_1x1 = placeholder(bool)   # True for MSRA ResNets
  config.input_format = placeholder(str)     # 'RGB' | 'BGR': the channel order
  config.pixel_mean = placeholder(tuple)     # in the weights' channel order, 0..255 units
  config.pixel_std = placeholder(tuple)
  config.freeze_at = 2                 # stem + res2 frozen (Detectron2's FREEZE_AT)
  config.fpn_channels = 256            # widths; smaller only for toy-scale CPU runs
  config.box_head_dim = 1024
  config.mask_head_dim = 256
  config.rpn_pre_nms_topk = (2000, 1000)   # (train, test), per level
  config.rpn_post_nms_topk = (1000, 1000)  # (train, test), per image
  config.roi_batch_size_per_image = 512
  config.roi_sampling_ratio = 2        # RoIAlign samples per bin side; 0: Detectron2's adaptive
  config.roi_max_sampling_ratio = 4    # the adaptive count's static cap (docs/detection.md)
  config.detections_per_image = 100    # kept per image at test time (mask head on each)
  config.weights = ''                  # initial weights: a Detectron2 .pkl, a torchvision
                                       # detection or ImageNet .pth; '' = random
  config.weights_source = 'auto'       # 'auto' | 'detectron2' | 'torchvision' | 'imagenet'

  # Distillation (docs/detection.md): a frozen teacher detector, never trained or saved.
  config.method = 'none'               # 'none' | 'reviewkd' | 'kd' | 'fitnet' | 'fgfi'
  config.teacher_backbone = ''         # e.g. 'resnet101'
  config.teacher_weights = ''          # Detectron2 .pkl, torchvision .pth, or a run's final/
  config.teacher_weights_source = 'auto'
  # The teacher's input convention; unset: the one its weights imply (a run folder: the
  # convention its config.json recorded).
  config.teacher_stride_in_1x1 = placeholder(bool)
  config.teacher_input_format = placeholder(str)
  config.teacher_pixel_mean = placeholder(tuple)
  config.teacher_pixel_std = placeholder(tuple)
  config.reviewkd_weight = 1.0         # lambda; no warm-up in detection
  config.kd_weight = 20.0              # the supplementary's weights
  config.kd_temperature = 1.0
  config.fitnet_weight = 0.1
  config.fgfi_weight = 0.01

  # Optimisation (Detectron2's SOLVER; lr for a global batch of base_batch_size).
  config.learning_rate = 0.02
  config.base_batch_size = 16
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.max_steps = 90000             # 0: evaluate the weights only
  config.lr_steps = (60000, 80000)
  config.lr_gamma = 0.1
  config.warmup_steps = 1000
  config.warmup_factor = 0.001

  # Loop, logs and checkpoints.
  config.seed = 0
  config.log_every_steps = 20
  config.eval_every_steps = 0          # 0: evaluate at the end only
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 3
  config.stop_after_step = 0
  return config
