"""A Mask R-CNN R18-FPN trained alone on the offline digit scenes (real handwritten digits
pasted on 96x96 canvases; reviewkd_jax/detection/scenes.py), the detection pipeline end to
end without any download.

  python main.py --config=configs/digit_scenes_detector.py --workdir=/tmp/digit_detector

The demo's toy-width detector (configs/demo_digit_scenes.py) on all 1024 training scenes for
1000 steps of 8, evaluated with COCO box and mask AP on 128 held-out scenes every 250 steps.
"""
import ml_collections

from configs import demo_digit_scenes


def get_config() -> ml_collections.ConfigDict:
  return demo_digit_scenes.scenes_run(train_subset=0, eval_subset=128, max_steps=1000,
                                      lr_steps=(700, 900), warmup_steps=100,
                                      eval_every_steps=250, checkpoint_every_steps=250)
