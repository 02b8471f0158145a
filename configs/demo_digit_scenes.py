"""Offline detection demo: ReviewKD on Mask R-CNN students, on scenes of real handwritten digits.

No COCO offline, so the scenes are composed from scikit-learn's 8x8 digits
(reviewkd_jax/detection/scenes.py): 1-4 digits upsampled 2-4x and pasted on a noisy 96x96
canvas, their boxes and ink masks as ground truth, 1024 training and 256 held-out scenes
built from disjoint digit images. A Mask R-CNN R18-FPN teacher is trained briefly (300 steps
of 8) on all 1024 training scenes; then, for each seed, the same architecture as a student
trained alone for 120 steps on 128 of those scenes, and the student distilled from the
teacher with ReviewKD over P2-P6 on the same 128 (as the classification demo: a teacher that
has seen more data). The summary compares the students' COCO box AP on 128 held-out scenes
(mask AP beside it).

  python main.py --config=configs/demo_digit_scenes.py --workdir=/tmp/reviewkd_detection_demo

Toy widths (FPN 64 channels, box head 256, mask head 32) and small RPN/RoI budgets (32 RoIs
per image in training, 20 detections per image) make it a CPU-sized detector; the paper's
detectors use 256/1024/256 (configs/coco_*.py). The canvas stays 96x96: at 64x64 the
ResNet's last stage is 2x2, where XLA:CPU's convolutions were so slow that a training step
took longer than at 96x96. The students of every seed compile the same programs, so the suite keeps them
(`compilation_cache`) and each later seed loads them instead of compiling.
"""
import ml_collections

from configs import detection_default
from configs import suites


def scenes_run(**fields) -> ml_collections.ConfigDict:
  """Returns one digit-scenes detection run: the defaults below, then `fields`."""
  config = detection_default.get_config()
  config.dataset = 'digit_scenes'
  config.train_min_sizes = (96,)
  config.train_max_size = 96
  config.test_min_size = 96
  config.test_max_size = 96
  config.pad_size = (96, 96)
  config.max_boxes = 4
  config.random_flip = False           # a mirrored digit is not a digit
  config.shuffle_buffer = 0
  config.mask = True
  config.backbone = 'resnet18'
  config.fpn_channels = 64
  config.box_head_dim = 256
  config.mask_head_dim = 32
  config.freeze_at = 0                 # random weights: nothing to keep frozen
  config.rpn_pre_nms_topk = (300, 200)
  config.rpn_post_nms_topk = (100, 50)
  config.roi_batch_size_per_image = 32
  config.detections_per_image = 20     # scenes hold at most 4 digits
  config.batch_size = 8
  config.eval_batch_size = 32
  config.base_batch_size = 16          # lr 0.02 * 8 / 16 = 0.01
  config.learning_rate = 0.02
  config.warmup_steps = 50
  config.train_subset = 128
  config.eval_subset = 128
  config.max_steps = 200
  config.lr_steps = (150,)
  config.log_every_steps = 50
  config.checkpoint_every_steps = 100
  config.eval_every_steps = 0          # evaluate at the end only
  config.update(fields)
  return config


SEEDS = (0, 1)


STUDENT = dict(max_steps=120, lr_steps=(96,), warmup_steps=30, checkpoint_every_steps=120)


def get_config() -> ml_collections.ConfigDict:
  """Returns the demo suite: the teacher, then each seed's student alone and with ReviewKD."""
  runs = {'teacher': scenes_run(train_subset=0, max_steps=300, lr_steps=(240,),
                                warmup_steps=30, checkpoint_every_steps=150)}
  teacher_input = dict(teacher_backbone='resnet18', teacher_weights='{workdir}/teacher/final',
                       teacher_stride_in_1x1=False, teacher_input_format='RGB',
                       teacher_pixel_mean=(123.675, 116.28, 103.53),
                       teacher_pixel_std=(58.395, 57.12, 57.375))
  for seed in SEEDS:
    runs[f'student_{seed}'] = scenes_run(seed=seed, **STUDENT)
    runs[f'reviewkd_{seed}'] = scenes_run(seed=seed, method='reviewkd', reviewkd_weight=1.0,
                                           **STUDENT, **teacher_input)
  config = suites.reviewkd_vs_alone(
      runs, SEEDS,
      teacher_note='trained on all 1024 training scenes; the students on 128 of them')
  config.compilation_cache = True
  return config
