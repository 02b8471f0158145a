"""The whole detector against torchvision's Mask R-CNN (and Faster R-CNN) with converted weights.

torchvision's `maskrcnn_resnet50_fpn` runs on CPU torch (`testing.torch_detection`); its
weights go through `detection.weights` into our `RCNN` with torchvision's conventions
(`DetectorConfig.torchvision`). Random weights would make every class equally likely (softmax
~1/(K+1) everywhere, ties decided by rounding) and every proposal its anchor, so the test
redraws the RPN head and the box predictor larger, which gives distinct scores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from reviewkd_jax.detection import model as model_lib  # noqa: E402
from reviewkd_jax.detection import roi_heads  # noqa: E402
from reviewkd_jax.detection import weights as weights_lib  # noqa: E402
from reviewkd_jax.testing import torch_detection  # noqa: E402
from tests.helpers import draw_variables  # noqa: E402

# The whole R50-FPN detector, forward and training, in both frameworks: end to end, hence
# `slow` (the parts are checked against torchvision one by one in the quick subset).
pytestmark = pytest.mark.slow

K = 4  # foreground classes (torchvision's num_classes=5 counts the background)


def _sharpen(model):
  gen = torch.Generator().manual_seed(7)
  with torch.no_grad():
    head = model.rpn.head
    for conv, std in ((head.conv[0][0], 0.02), (head.cls_logits, 0.002), (head.bbox_pred, 0.002)):
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
      conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.5)
    pred = model.roi_heads.box_predictor
    pred.cls_score.weight.mul_(0.2)
    pred.cls_score.bias.copy_(torch.randn(pred.cls_score.bias.shape, generator=gen))
  return model


@pytest.fixture(scope='module')
def pair():
  tv = _sharpen(torch_detection.build('mask', num_classes=K + 1, min_size=128, max_size=160))
  config = model_lib.DetectorConfig.torchvision(K, mask=True)
  module = model_lib.RCNN(config)
  template = model_lib.abstract_variables(module)
  loaded = weights_lib.load_detector_weights(tv.state_dict(), template, source='torchvision')
  return tv, module, loaded.variables


def _images(seed=0, n=2):
  rng = np.random.default_rng(seed)
  # Random images in [0, 1]: no two locations alike, so no ties in any ranking.
  return rng.uniform(size=(n, 3, 128, 160)).astype(np.float32)


def test_detections_match_torchvision(pair):
  """Two images of different widths: torchvision pads the narrower one with 0 after
  normalising (its batch is 128x160); ours sees the same canvas with its true size."""
  tv, module, variables = pair
  x = _images()
  widths = (160, 144)
  with torch.no_grad():
    ref = tv([torch.from_numpy(im[:, :, :wd]) for im, wd in zip(x, widths)])
  canvas = x.copy()
  canvas[1, :, :, widths[1]:] = 0.0   # raw zeros: the model must not normalise them
  images = jnp.asarray(canvas.transpose(0, 2, 3, 1) * 255.0)
  sizes = jnp.asarray([[128, wd] for wd in widths], jnp.int32)
  dets = jax.jit(lambda v, i, s: module.apply(v, i, s, method=model_lib.RCNN.predict))(
      variables, images, sizes)
  pasted = roi_heads.paste_masks(dets.masks, dets.boxes, 128, 160, rule='torchvision')
  worst = {'boxes': 0.0, 'scores': 0.0, 'masks': 1.0}
  for i, r in enumerate(ref):
    valid = np.asarray(dets.valid[i])
    n = int(valid.sum())
    assert n == len(r['boxes']) and n > 10, (n, len(r['boxes']))
    boxes, scores = np.asarray(dets.boxes[i])[:n], np.asarray(dets.scores[i])[:n]
    labels = np.asarray(dets.classes[i])[:n] + 1
    # Pair each of torchvision's detections with ours of the same class and nearest box:
    # equal scores (within float error) may come in either order.
    diff = np.abs(r['boxes'].numpy()[:, None] - boxes[None]).max(-1)
    diff[r['labels'].numpy()[:, None] != labels[None]] = np.inf
    match = diff.argmin(1)
    assert sorted(match.tolist()) == list(range(n)), 'not one-to-one'
    box_err = diff[np.arange(n), match].max()
    score_err = np.abs(scores[match] - r['scores'].numpy()).max()
    ours = np.asarray(pasted[i])[:n][match][:, :, :widths[i]] > 0.5
    theirs = r['masks'].numpy()[:, 0] > 0.5
    agree = (ours == theirs).mean()
    worst = {'boxes': max(worst['boxes'], box_err), 'scores': max(worst['scores'], score_err),
             'masks': min(worst['masks'], agree)}
  print(f'\nworst box error {worst["boxes"]:.2e} px, score error {worst["scores"]:.2e}, '
        f'mask pixels agreeing {100 * worst["masks"]:.4f}%')
  # Boxes: decoded in float32 from features that agree to ~1e-5 relative; a box coordinate
  # of ~100 px moves by ~1e-3 px. Masks: pasted probabilities thresholded at 0.5 flip only
  # where they are within float error of 0.5.
  assert worst['boxes'] < 2e-2
  assert worst['scores'] < 1e-4
  assert worst['masks'] > 0.999


def test_training_losses_run_and_reach_every_trainable_part():
  # Narrow heads and FPN (the ResNet-50 body as in the paper's detectors): what is checked is
  # where the gradients go, not the widths, and the full-width mask head costs minutes here.
  config = model_lib.DetectorConfig.torchvision(K, mask=True, fpn_channels=32, box_head_dim=64,
                                                mask_head_dim=16)
  module = model_lib.RCNN(config)
  variables = draw_variables(model_lib.abstract_variables(module))
  x = _images(1)
  batch = {
      'image': jnp.asarray(x.transpose(0, 2, 3, 1) * 255.0),
      'image_size': jnp.asarray([[128, 160], [100, 150]], jnp.int32),
      'boxes': jnp.asarray([[[10, 20, 60, 90], [30, 30, 100, 120], [0, 0, 0, 0]]] * 2,
                           jnp.float32),
      'labels': jnp.asarray([[1, 3, 0]] * 2, jnp.int32),
      'gt_valid': jnp.asarray([[True, True, False]] * 2),
      'masks': jnp.zeros((2, 3, 128, 160), jnp.uint8).at[:, 0, 25:85, 15:55].set(1),
  }

  def total(params, key):
    losses = module.apply({**variables, 'params': params}, batch, key,
                          method=model_lib.RCNN.losses)
    return sum(losses.values()), losses

  value_and_grad = jax.jit(jax.value_and_grad(total, has_aux=True))
  (loss, losses), grads = value_and_grad(variables['params'], jax.random.key(0))
  assert set(losses) == {'loss_rpn_cls', 'loss_rpn_loc', 'loss_cls', 'loss_box_reg',
                         'loss_mask'}
  assert all(np.isfinite(float(v)) for v in losses.values())
  norms = {k: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(t))))
           for k, t in grads.items()}
  assert all(v > 0 for v in norms.values()), norms
  # The same key draws the same samples; another key other ones.
  again = value_and_grad(variables['params'], jax.random.key(0))[0][0]
  other = value_and_grad(variables['params'], jax.random.key(1))[0][0]
  assert float(again) == float(loss)
  assert float(other) != float(loss)
