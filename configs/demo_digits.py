"""Offline demo: ReviewKD end to end on scikit-learn's digits, in a few minutes on a CPU.

A resnet20 teacher trained on all 1347 training digits, then, for each of three seeds, a
resnet8 student trained alone on 100 of those digits (10 per class) and the same student
distilled from the teacher with ReviewKD on the same 100. A teacher that has seen more data
than its student is a common and legitimate distillation setting; with only 100 images the
student alone is far from what the architecture can reach, which is where a teacher helps.
The last lines compare the students on the 450 held-out digits: each group's mean and
spread over the seeds, and the gain, in one sentence; `accuracy.png` in the workdir plots
every run's held-out accuracy over the epochs.

  python main.py --config=configs/demo_digits.py --workdir=/tmp/reviewkd_demo

Batches of 25 fit one device: on a machine with several accelerators, show it one
(e.g. CUDA_VISIBLE_DEVICES=0) or set batch sizes that divide over them.
"""
import ml_collections

from configs import default
from configs import suites


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


SEEDS = (0, 1, 2)


def get_config() -> ml_collections.ConfigDict:
  """Returns the demo suite: the teacher, then each seed's student alone and with ReviewKD."""
  runs = {'teacher': _digits_run(model='resnet20', train_subset=0, num_epochs=12,
                                 lr_decay_epochs=(8, 10), eval_every_epochs=4,
                                 checkpoint_every_epochs=4, log_every_steps=212)}
  for seed in SEEDS:
    runs[f'student_{seed}'] = _digits_run(model='resnet8', seed=seed)
    runs[f'reviewkd_{seed}'] = _digits_run(
        model='resnet8', seed=seed, method='reviewkd', teacher='resnet20',
        teacher_weights='{workdir}/teacher',
        # Eval-mode BN: statistics of batches of 25 are too noisy for the teacher (the
        # authors' CIFAR batch-statistics teacher sees batches of 128).
        teacher_bn_mode='eval', reviewkd_weight=1.0, reviewkd_warmup_epochs=4)
  return suites.reviewkd_vs_alone(
      runs, SEEDS, teacher_note='trained on all 1347 training digits; the students on 100 of them')
