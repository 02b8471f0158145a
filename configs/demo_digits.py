"""Offline demo: ReviewKD end to end on scikit-learn's digits, in a few minutes on a CPU.

Three runs, in order, each in its own folder of the workdir: a resnet20 teacher, a resnet8
student alone, and a resnet8 student distilled from that teacher with ReviewKD. The last
lines printed compare the three on the held-out quarter of the digits (450 images).

The full digits training set (1347 images) is too easy to show anything: every network
reaches ~99.5%. All three runs therefore train on the same 100 images (10 per class), the
regime where a teacher's knowledge matters.

  python main.py --config=configs/demo_digits.py --workdir=/tmp/reviewkd_demo

Batches of 25 fit one device: on a machine with several accelerators, show it one
(e.g. CUDA_VISIBLE_DEVICES=0) or set batch sizes that divide over them.
"""
import ml_collections

from configs import default


def _digits_run(**fields) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'digits'
  config.train_subset = 100
  config.batch_size = 25
  config.base_batch_size = 25
  config.eval_batch_size = 256
  config.num_epochs = 40
  config.learning_rate = 0.1
  config.lr_decay_epochs = (26, 33)
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 5
  config.log_every_steps = 40
  config.update(fields)
  return config


def get_config() -> ml_collections.ConfigDict:
  """Returns the demo suite: teacher, student alone, student with ReviewKD."""
  config = ml_collections.ConfigDict()
  config.runs = ml_collections.ConfigDict({
      'teacher': _digits_run(model='resnet20'),
      'student': _digits_run(model='resnet8'),
      'reviewkd': _digits_run(
          model='resnet8', method='reviewkd', teacher='resnet20',
          teacher_checkpoint='{workdir}/teacher',
          # Eval-mode BN: statistics of batches of 25 are too noisy for the teacher (the
          # authors' CIFAR batch-statistics teacher sees batches of 128).
          teacher_bn_mode='eval', reviewkd_weight=1.0, reviewkd_warmup_epochs=4),
  })
  config.run_order = ('teacher', 'student', 'reviewkd')
  return config
