"""Times the checkpoint checksums (CRC-32 of every array, `train.checkpoint.array_digests`)
on TrainStates the size of real runs: ImageNet resnet34 -> resnet18 (ReviewKD) and COCO
Faster R-CNN R18-FPN <- R101-FPN (ReviewKD). The shapes come from the configs (traced,
nothing computed); the arrays are random numpy data of those shapes on the host, so the
figure is the hashing alone (a save or restore on an accelerator adds its device-to-host
copy, which orbax makes anyway when it writes).

  python benchmarks/checksum_cost.py
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import coco_distill
from configs import imagenet_r34_r18
from reviewkd_jax import data
from reviewkd_jax.train import checkpoint
from reviewkd_jax.train import detection
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib
from reviewkd_jax.detection import model as model_lib


def imagenet_state_shapes():
  config = imagenet_r34_r18.get_config()
  spec = data.get_spec(config.dataset)
  run = setup_lib.build_run(config, spec, mesh=state_lib.make_mesh(jax.devices()[:1]),
                            steps_per_epoch=5005)
  return jax.eval_shape(run.init_state)


def coco_state_shapes():
  config = detection.resolve_input_conventions(
      coco_distill.get_config('pair=faster_r18_r101,method=reviewkd'))
  student = model_lib.RCNN(detection.detector_config(config, 80))
  teacher = model_lib.RCNN(detection.detector_config(config, 80, teacher=True))
  image = jnp.zeros((1, *config.pad_size, 3), jnp.float32)
  svars = model_lib.abstract_variables(student)
  tvars = model_lib.abstract_variables(teacher)
  sfeats = jax.eval_shape(lambda v: student.apply(v, image, method=model_lib.RCNN.features),
                          svars)
  tfeats = jax.eval_shape(lambda v: teacher.apply(v, image, method=model_lib.RCNN.features),
                          tvars)
  adapter = detection.build_adapter(config, {k: v.shape[-1] for k, v in tfeats.items()})
  zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in sfeats.items()}
  hvars = dict(jax.eval_shape(lambda k: adapter.init(
      k, detection.det_distill.pyramid(zeros), train=False), jax.random.key(0)))
  svars = dict(svars)
  params = {'student': svars.pop('params'), 'distill': hvars.pop('params')}
  tx, _ = detection.make_detector_optimizer(config, params)
  return {'params': params, 'model_state': {'student': svars, 'distill': hvars},
          'opt_state': jax.eval_shape(tx.init, params)}


def time_digests(shapes, repeats: int = 5) -> tuple[int, int, float]:
  """Returns (arrays, bytes, seconds per `array_digests` call, best of `repeats`)."""
  rng = np.random.default_rng(0)
  leaves = [x for x in jax.tree.leaves(shapes) if hasattr(x, 'shape')]
  arrays = [rng.integers(0, 2**31, size=x.shape, dtype=np.int64).astype(x.dtype)
            if np.issubdtype(x.dtype, np.integer) else
            rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype) for x in leaves]
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    checkpoint.array_digests(arrays)
    best = min(best, time.perf_counter() - start)
  return len(arrays), sum(a.nbytes for a in arrays), best


def main():
  for name, shapes in (('ImageNet resnet34->resnet18 ReviewKD TrainState',
                        imagenet_state_shapes()),
                       ('COCO Faster R-CNN R18-FPN <- R101-FPN ReviewKD TrainState',
                        coco_state_shapes())):
    n, nbytes, seconds = time_digests(shapes)
    print(f'{name}: {n} arrays, {nbytes / 2**20:.1f} MiB, CRC-32 of every array '
          f'{1e3 * seconds:.0f} ms ({nbytes / 2**30 / seconds:.2f} GiB/s)')


if __name__ == '__main__':
  main()
