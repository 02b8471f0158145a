"""Padding: what lies outside each image's true size never reaches the detector's results.

Detectron2 (`ImageList.from_tensors(pad_value=0)`) and torchvision
(`GeneralizedRCNNTransform`) pad the *normalised* images with 0, and both compute mask
targets on the image-sized ground-truth masks. The end-to-end comparison with torchvision on
a batch of two image sizes is `test_detection_model.py::test_detections_match_torchvision`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reviewkd_jax.detection import model as model_lib
from reviewkd_jax.detection import roi_heads
from tests.helpers import draw_variables

H, W = 72, 88          # the image
CANVAS = (96, 128)     # its padded canvas


@pytest.fixture(scope='module')
def toy():
  return _toy()


def _toy():
  config = model_lib.DetectorConfig(backbone='resnet18', num_classes=3, fpn_channels=16,
                                    box_head_dim=32)
  module = model_lib.RCNN(config)
  # Non-trivial biases and frozen statistics, so the padding region is not 0 after a layer.
  return module, draw_variables(model_lib.abstract_variables(module), seed=1)


def _canvases():
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, (H, W, 3)).astype(np.float32)
  zeros = np.zeros((*CANVAS, 3), np.float32)
  zeros[:H, :W] = image
  noise = rng.uniform(0, 255, (*CANVAS, 3)).astype(np.float32)   # any raw padding at all
  noise[:H, :W] = image
  return jnp.asarray(np.stack([zeros, noise]))


def test_raw_padding_never_reaches_features_or_detections(toy):
  module, variables = toy
  images = _canvases()
  sizes = jnp.asarray([[H, W]] * 2, jnp.int32)

  @jax.jit
  def run(v, x, s):   # one program: features with and without the sizes, detections
    return (module.apply(v, x, s, method=model_lib.RCNN.normalize),
            module.apply(v, x, s, method=model_lib.RCNN.features),
            module.apply(v, x, method=model_lib.RCNN.features),
            module.apply(v, x, s, method=model_lib.RCNN.predict))

  normalized, feats, whole, dets = run(variables, images, sizes)
  assert float(jnp.abs(normalized[:, H:]).max()) == 0.0
  assert float(jnp.abs(normalized[:, :, W:]).max()) == 0.0
  for name, f in feats.items():   # the whole canvas, every level: same input, same output
    np.testing.assert_allclose(np.asarray(f[0]), np.asarray(f[1]), rtol=0, atol=1e-5,
                               err_msg=name)
  assert int(dets.valid[0].sum()) > 0
  for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[0], dets)),
                  jax.tree.leaves(jax.tree.map(lambda x: x[1], dets))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  # Without the true sizes the raw padding is normalised like the image and shows.
  assert float(jnp.abs(whole['p2'][0] - whole['p2'][1]).max()) > 1e-2


def test_mask_targets_of_objects_cut_by_the_border_sample_the_image_sized_mask():
  """An object touching the right and bottom edge: the RoIs reach past the image; samples
  there clamp to the last real row/column (Detectron2's `BitMasks.crop_and_resize` on the
  image-sized mask), not the zero canvas."""
  h, w = 50, 61
  mask = np.zeros((h, w), np.uint8)
  mask[30:, 40:] = 1                                   # cut by the right and bottom border
  mask[5:20, 5:25] = 1
  boxes = jnp.asarray([[[38.0, 28.0, 63.5, 52.5], [40.0, 30.0, 61.0, 50.0],
                        [44.2, 33.7, 64.9, 55.1], [3.0, 4.0, 27.0, 21.0]]])
  matched = jnp.zeros((1, 4), jnp.int32)
  canvas = np.zeros((1, 1, 64, 80), np.uint8)
  canvas[0, 0, :h, :w] = mask
  targets = jax.jit(roi_heads.mask_targets, static_argnames='rule')
  for rule in roi_heads.MASK_TARGET_RULES:
    exact = targets(jnp.asarray(mask[None, None]), boxes, matched, rule=rule)
    padded = targets(jnp.asarray(canvas), boxes, matched, rule=rule,
                     image_sizes=jnp.asarray([[h, w]]))
    np.testing.assert_allclose(np.asarray(padded), np.asarray(exact), atol=1e-6, err_msg=rule)
    # Sampling the zero canvas instead changes the cut RoIs' targets (what this test guards).
    unclamped = targets(jnp.asarray(canvas), boxes, matched, rule=rule)
    assert float(jnp.abs(unclamped[0, :3] - exact[0, :3]).max()) > 0.1, rule
    np.testing.assert_allclose(np.asarray(unclamped[0, 3]), np.asarray(exact[0, 3]), atol=1e-6)
