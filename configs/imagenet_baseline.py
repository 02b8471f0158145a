"""An ImageNet network trained alone (the students' baselines; teachers come from torchvision).

  python main.py --config=configs/imagenet_baseline.py:model=resnet18 \
      --workdir=gs://BUCKET/resnet18

MODEL: one of MODELS (a wrong one lists them). The ImageNet pair configs
(`imagenet_<teacher>_<student>.py`) are this recipe of the student plus their row of
configs/pairs.py.
"""
import ml_collections

from configs import args
from configs import default

MODELS = ('resnet18', 'mobilenet_v1', 'resnet34', 'resnet50')
ARGS = {'model': MODELS}


def recipe(model: str) -> ml_collections.ConfigDict:
  """Returns the ImageNet recipe of the authors' imagenet_amp.py for `model` alone."""
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe of `arg`, 'model=NAME', e.g. `get_config('model=resnet18')`."""
  return recipe(args.parse(arg, ARGS, 'configs/imagenet_baseline.py')['model'])
