"""An ImageNet network trained alone (the students' baselines; teachers come from torchvision).

  python main.py --config=configs/imagenet_baseline.py:resnet18 --workdir=gs://BUCKET/resnet18
"""
import ml_collections

from configs import default

MODELS = ('resnet18', 'mobilenet_v1', 'resnet34', 'resnet50')


def get_config(model: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ImageNet recipe of the authors' imagenet_amp.py for `model` alone."""
  if model not in MODELS:
    raise ValueError(f'Name the network after the file: configs/imagenet_baseline.py:NAME with '
                     f'NAME one of {", ".join(MODELS)}; got {model!r}.')
  config = default.get_config()
  config.dataset = 'imagenet2012'
  config.model = model
  config.batch_size = 256
  config.eval_batch_size = 1024
  config.num_epochs = 100
  config.learning_rate = 0.1
  config.base_batch_size = 256      # lr = 0.1 * batch_size / 256, as the authors scale it
  config.nesterov = False
  config.weight_decay = 1e-4
  config.lr_decay_epochs = (30, 60, 90)
  config.log_every_steps = 500
  config.keep_checkpoints = 2
  config.checkpoint_every_steps = 2000  # an epoch is ~5000 steps at batch 256
  return config


def reviewkd_config(*, teacher: str, student: str, reviewkd_weight: float,
                    student_features: str, teacher_features: str,
                    mid_channels: int = 0) -> ml_collections.ConfigDict:
  """Returns ReviewKD for an ImageNet pair, as the authors' ImageNet script runs it.

  The feature kinds are what the authors' code computes, not what it reads like (see
  docs/reviewkd.md, "Feature conventions"): their ImageNet ResNets return each stage's
  output "before the last ReLU" but then apply `nn.ReLU(inplace=True)` to that very tensor,
  so ResNet features are post-ReLU ('stages'); their MobileNet uses the functional `F.relu`,
  so its features really are pre-ReLU ('preact').
  """
  config = get_config(student)
  config.method = 'reviewkd'
  config.teacher = teacher
  config.teacher_bn_mode = 'eval'        # the authors call teacher.eval() on ImageNet
  config.student_features = student_features
  config.teacher_features = teacher_features
  config.reviewkd_weight = reviewkd_weight
  config.reviewkd_warmup_epochs = 0      # no warm-up on ImageNet
  config.mid_channels = mid_channels     # 0: derived, min(512, deepest student channels)
  return config
