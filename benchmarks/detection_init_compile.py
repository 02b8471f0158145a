"""Compiles the detection set-up's two initialisations (the demo's Mask R-CNN R18-FPN and its
ReviewKD adapter) at `platform.CPU_INIT_OPTIONS` and at XLA's default level, in turn, and says
how long each compile took and whether the variables are bit-identical.

  python benchmarks/detection_init_compile.py
"""
from __future__ import annotations

import time

import jax
import numpy as np

from configs import demo_digit_scenes
from reviewkd_jax import platform
from reviewkd_jax.detection import model as model_lib
from reviewkd_jax.train import detection


def main():
  platform.skip_absent_tpu()
  config = demo_digit_scenes.get_config().runs.reviewkd_0
  config.teacher_weights = ''   # the teacher's weights are not read here
  config = detection.resolve_input_conventions(config)
  module = model_lib.RCNN(detection.detector_config(config, 10))
  image = jax.numpy.zeros((1, *config.pad_size, 3))
  shapes = jax.eval_shape(
      lambda k: module.apply(model_lib.init_variables(module, k), image,
                             method=model_lib.RCNN.features), jax.random.key(0))
  method = detection.methods_lib.get_detection_method('reviewkd')
  adapter = method.build_adapter(config, {k: v.shape[-1] for k, v in shapes.items()})
  args, kw = method.adapter_inputs({k: jax.numpy.zeros(v.shape, v.dtype)
                                    for k, v in shapes.items()})
  programs = (('detector', lambda k: model_lib.init_variables(module, k)),
              ('reviewkd adapter', lambda k: adapter.init(k, *args, **kw)))
  for name, init in programs:
    lowered = jax.jit(init).lower(jax.random.key(0))
    start = time.perf_counter()
    fast = lowered.compile(platform.CPU_INIT_OPTIONS)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    default = lowered.compile()
    default_s = time.perf_counter() - start
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                        fast(jax.random.key(0)), default(jax.random.key(0))))
    print(f'{name}: compiled in {fast_s:.1f} s at {platform.CPU_INIT_OPTIONS}, '
          f'{default_s:.1f} s at the default level; {sum(same)} of {len(same)} arrays '
          'bit-identical')


if __name__ == '__main__':
  main()
