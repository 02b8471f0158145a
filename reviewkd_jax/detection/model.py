"""Faster R-CNN and Mask R-CNN with FPN: Detectron2's `GeneralizedRCNN` + `StandardROIHeads`.

`RCNN(config)` is one Flax module with the pinned tree `backbone/{body,fpn}`, `rpn`,
`box_head`, `box_predictor`[, `mask_head`] (`detection/weights.py` converts torchvision and
Detectron2 weights into it). Its methods, for `module.apply(variables, ..., method=...)`:

- `features(images, image_sizes)`: the FPN levels {'p2'..'p6'} of raw images (normalised
  inside, the padding set to 0 after normalising);
- `losses(batch, key)`: the training losses of a batch (dict; Detectron2's names), drawing the
  RPN's and the RoI heads' samples from `key`;
- `predict(images, image_sizes)`: `roi_heads.Detections` (boxes in the resized image's pixels,
  scores, classes, valid, and 28x28 mask probabilities for Mask R-CNN).

Input convention: images are (B, H, W, 3) float32 RGB in 0..255, padded at the bottom/right
(`detection/data.py`). The model turns them into what its weights expect: `input_format`
'BGR' reverses the channels first (Detectron2's MSRA models), then `(x - pixel_mean) /
pixel_std`, both given in the weights' channel order; the padding outside each image's true
size (`image_sizes`) is then 0, as Detectron2's `ImageList.from_tensors` and torchvision's
`GeneralizedRCNNTransform` pad the normalised images, so no raw pixel value of the padding
reaches the network and a feature inside the image does not depend on the canvas' colour. Detectron2 model-zoo R50/R101 detectors:
BGR, mean (103.53, 116.28, 123.675), std 1, `stride_in_1x1=True`; torchvision-initialised
students (R18, MobileNetV2) and torchvision's detectors: RGB, ImageNet mean and std (in 0..255).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reviewkd_jax.detection import anchors as anchor_ops
from reviewkd_jax.detection import backbone as backbone_lib
from reviewkd_jax.detection import roi_heads
from reviewkd_jax.detection import rpn as rpn_lib

IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)
MSRA_BGR_MEAN = (103.53, 116.28, 123.675)
LEVELS = ('p2', 'p3', 'p4', 'p5', 'p6')


class InputConvention(NamedTuple):
  """What a detector's weights expect of their input, beside the architecture."""
  stride_in_1x1: bool
  input_format: str
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]

  def describe(self) -> str:
    return (f'{self.input_format}, pixel_mean={self.pixel_mean}, pixel_std={self.pixel_std}, '
            f'stride_in_1x1={self.stride_in_1x1}')


# Detectron2's model-zoo R50/R101 detectors (MSRA ResNets); torchvision's detectors and every
# torchvision-initialised body.
MSRA_INPUT = InputConvention(True, 'BGR', MSRA_BGR_MEAN, (1.0, 1.0, 1.0))
TORCHVISION_INPUT = InputConvention(False, 'RGB', IMAGENET_RGB_MEAN, IMAGENET_RGB_STD)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """Everything that defines a detector's computation (hashable: a static jit argument).

  Attributes:
    backbone: 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101' | 'mobilenet_v2'.
    num_classes: K foreground classes (80 for COCO).
    mask: Mask R-CNN (a mask head) rather than Faster R-CNN.
    stride_in_1x1: MSRA ResNets (Detectron2 model-zoo weights).
    input_format: the channel order the weights expect ('RGB' or 'BGR').
    pixel_mean, pixel_std: per channel, in the weights' channel order, in 0..255 units.
    freeze_at: Detectron2's FREEZE_AT (2: stem and res2 frozen; every body BN frozen).
    fpn_channels, box_head_dim, mask_head_dim: the widths of the FPN (256), the box head's
      two FC layers (1024) and the mask head's convs (256); smaller values make toy-scale
      detectors (the offline digit scenes on a CPU), never the paper's.
    rpn: the RPN's rules.
    roi: the RoI heads' rules (its num_classes must equal `num_classes`).
  """
  backbone: str = 'resnet50'
  num_classes: int = 80
  mask: bool = False
  stride_in_1x1: bool = False
  input_format: str = 'RGB'
  pixel_mean: tuple[float, float, float] = IMAGENET_RGB_MEAN
  pixel_std: tuple[float, float, float] = IMAGENET_RGB_STD
  freeze_at: int = 2
  fpn_channels: int = 256
  box_head_dim: int = 1024
  mask_head_dim: int = 256
  rpn: rpn_lib.RPNConfig = rpn_lib.RPNConfig()
  roi: roi_heads.RoIHeadsConfig | None = None

  def __post_init__(self):
    if self.input_format not in ('RGB', 'BGR'):
      raise ValueError(f"input_format must be 'RGB' or 'BGR', got {self.input_format!r}")
    if self.backbone not in backbone_lib.BACKBONES:
      raise ValueError(f'Unknown backbone {self.backbone!r}; choose one of '
                       f'{backbone_lib.BACKBONES}')
    if self.roi is None:
      object.__setattr__(self, 'roi', roi_heads.RoIHeadsConfig(num_classes=self.num_classes))
    if self.roi.num_classes != self.num_classes:
      raise ValueError(f'roi.num_classes={self.roi.num_classes} but num_classes='
                       f'{self.num_classes}')

  @classmethod
  def torchvision(cls, num_classes: int, *, mask: bool = False, backbone: str = 'resnet50',
                  **overrides) -> 'DetectorConfig':
    """Returns torchvision's `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn` rules.

    `num_classes` counts foreground classes only (torchvision's counts the background too).
    """
    return cls(backbone=backbone, num_classes=num_classes, mask=mask,
               rpn=rpn_lib.RPNConfig.torchvision(),
               roi=roi_heads.RoIHeadsConfig.torchvision(num_classes), **overrides)

  @classmethod
  def detectron2_msra(cls, num_classes: int = 80, *, mask: bool = False,
                      backbone: str = 'resnet101', **overrides) -> 'DetectorConfig':
    """Returns a Detectron2 model-zoo detector's settings (MSRA ResNet, BGR, std 1).

    `overrides` may replace any field, the input convention's included.
    """
    fields = dict(MSRA_INPUT._asdict(), backbone=backbone, num_classes=num_classes, mask=mask)
    fields.update(overrides)
    return cls(**fields)

  @property
  def input_convention(self) -> 'InputConvention':
    """The input rules the weights were trained with (stride rule, channel order, mean, std)."""
    return InputConvention(self.stride_in_1x1, self.input_format, tuple(self.pixel_mean),
                           tuple(self.pixel_std))

  def with_input_convention(self, convention: 'InputConvention') -> 'DetectorConfig':
    """Returns this config with `convention`'s four fields (e.g. `LoadedWeights.convention`)."""
    return dataclasses.replace(self, **convention._asdict())


class RCNN(nn.Module):
  """Faster R-CNN (`config.mask=False`) or Mask R-CNN with an FPN; see the module docstring."""
  config: DetectorConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.backbone = backbone_lib.build_backbone(c.backbone, stride_in_1x1=c.stride_in_1x1,
                                                fpn_channels=c.fpn_channels,
                                                with_body=True, dtype=self.dtype)
    self.rpn = rpn_lib.RPNHead(num_anchors=c.rpn.num_anchors, dtype=self.dtype)
    self.box_head = roi_heads.BoxHead(hidden=c.box_head_dim, dtype=self.dtype)
    self.box_predictor = roi_heads.BoxPredictor(c.num_classes, dtype=self.dtype)
    if c.mask:
      self.mask_head = roi_heads.MaskHead(c.num_classes, conv_dims=c.mask_head_dim,
                                          dtype=self.dtype)

  def normalize(self, images: jax.Array, image_sizes: jax.Array | None = None) -> jax.Array:
    """Returns raw RGB 0..255 images in the weights' channel order, mean and std.

    With `image_sizes` (B, 2), every pixel outside image i's top-left (h, w) is 0 after
    normalising (the libraries' padding); without, the whole canvas is the image.
    """
    c = self.config
    x = images.astype(jnp.float32)
    if c.input_format == 'BGR':
      x = x[..., ::-1]
    x = (x - jnp.asarray(c.pixel_mean, jnp.float32)) / jnp.asarray(c.pixel_std, jnp.float32)
    if image_sizes is not None:
      sizes = jnp.asarray(image_sizes, jnp.int32)
      rows = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :, None] < sizes[:, 0, None, None]
      cols = jnp.arange(x.shape[2], dtype=jnp.int32)[None, None, :] < sizes[:, 1, None, None]
      x = jnp.where((rows & cols)[..., None], x, 0.0)
    return x.astype(self.dtype)

  def features(self, images: jax.Array,
               image_sizes: jax.Array | None = None) -> dict[str, jax.Array]:
    """Returns the FPN levels {'p2', ..., 'p6'} and the body's stages {'c2', ..., 'c5'}
    (NHWC) of raw RGB 0..255 images, padded with 0 after normalising beyond `image_sizes`
    (B, 2) (the batch's 'image_size'; omitted, the whole canvas is the image)."""
    return self.backbone(self.normalize(images, image_sizes))

  def _rpn(self, feats: Mapping[str, jax.Array], image_shape):
    levels = [feats[name] for name in LEVELS]
    objectness, deltas = self.rpn(levels)
    anchors = anchor_ops.grid_anchors(self.config.rpn.anchors,
                                      [tuple(f.shape[1:3]) for f in levels], image_shape)
    return levels, anchors, objectness, deltas

  def losses(self, batch: Mapping[str, jax.Array], key: jax.Array,
             feats: Mapping[str, jax.Array] | None = None, *, return_aux: bool = False):
    """Returns the training losses {'loss_rpn_cls', 'loss_rpn_loc', 'loss_cls',
    'loss_box_reg'[, 'loss_mask']} of a batch (`detection/data.py`'s format).

    `feats` lets a caller that needs the student's pyramid (distillation) pass the one it
    computed with `features`, so the backbone runs once. With `return_aux`, returns
    (losses, aux) where aux holds 'samples' (`roi_heads.RoISamples`: the sampled RoIs, which
    KD runs the teacher's RoI head on) and 'class_logits' (B, S, K + 1) on them.
    """
    c = self.config
    if feats is None:
      feats = self.features(batch['image'], batch['image_size'])
    levels, anchors, objectness, deltas = self._rpn(feats, batch['image'].shape[1:3])
    rpn_key, roi_key = jax.random.split(key)
    gt_boxes = batch['boxes'].astype(jnp.float32)
    gt_valid = batch['gt_valid']
    losses = rpn_lib.rpn_losses(c.rpn, anchors, objectness, deltas, gt_boxes, gt_valid,
                                key=rpn_key)
    proposals = rpn_lib.propose(c.rpn, anchors, objectness, deltas, batch['image_size'],
                                training=True)
    logits_seen = []

    def box_predictor(x):
      out = self.box_predictor(x)
      logits_seen.append(out[0])
      return out

    roi_losses, samples = roi_heads.roi_losses(
        c.roi, self.box_head, box_predictor, self.mask_head if c.mask else None,
        levels[:4], proposals.boxes, proposals.valid, gt_boxes, batch['labels'], gt_valid,
        gt_masks=batch.get('masks') if c.mask else None, key=roi_key,
        image_sizes=batch['image_size'])
    losses.update(roi_losses)
    if return_aux:
      return losses, {'samples': samples, 'class_logits': logits_seen[0]}
    return losses

  def roi_logits(self, feats: Mapping[str, jax.Array], boxes: jax.Array) -> jax.Array:
    """Returns the (B, S, K + 1) class logits of the box head on given (B, S, 4) boxes
    (a teacher's RoI head on the student's RoIs, for KD)."""
    levels = [feats[name] for name in LEVELS[:4]]
    pooled = roi_heads.pool(self.config.roi, levels, jax.lax.stop_gradient(boxes),
                            self.config.roi.box_pool_size)
    return self.box_predictor(self.box_head(pooled))[0]

  def predict(self, images: jax.Array, image_sizes: jax.Array) -> roi_heads.Detections:
    """Returns the detections of raw RGB images (B, H, W, 3) with true sizes (B, 2)."""
    c = self.config
    feats = self.features(images, image_sizes)
    levels, anchors, objectness, deltas = self._rpn(feats, images.shape[1:3])
    proposals = rpn_lib.propose(c.rpn, anchors, objectness, deltas, image_sizes,
                                training=False)
    return roi_heads.roi_inference(c.roi, self.box_head, self.box_predictor,
                                   self.mask_head if c.mask else None, levels[:4],
                                   proposals.boxes, proposals.valid, image_sizes)

  def __call__(self, images: jax.Array, image_sizes: jax.Array) -> roi_heads.Detections:
    """`predict`."""
    return self.predict(images, image_sizes)

  def touch_every_part(self, images: jax.Array) -> list[jax.Array]:
    """Runs every part once, on one RoI of zeros for the heads: what `init_variables` runs.

    A part's variables depend only on its path and input channels, so they are those that
    `init` through `predict` makes, without the proposals' sorting and NMS that XLA would
    compile only to discard.
    """
    c = self.config
    feats = self.features(images)
    outputs = [*self.rpn([feats[name] for name in LEVELS])]
    pooled = jnp.zeros((1, 1, c.roi.box_pool_size, c.roi.box_pool_size, c.fpn_channels),
                       self.dtype)
    outputs += [*self.box_predictor(self.box_head(pooled))]
    if c.mask:
      pooled = jnp.zeros((1, 1, c.roi.mask_pool_size, c.roi.mask_pool_size, c.fpn_channels),
                         self.dtype)
      outputs.append(self.mask_head(pooled))
    return outputs


def init_variables(module: RCNN, key: jax.Array, image_shape=(64, 64)) -> dict:
  """Returns fresh variables of `module` (traced at a small image; shapes do not depend on it)."""
  images = jnp.zeros((1, *image_shape, 3), jnp.float32)
  return module.init(key, images, method=RCNN.touch_every_part)


def abstract_variables(module: RCNN, image_shape=(64, 64)) -> Any:
  """Returns the variables' shapes and dtypes without computing them (a weights template)."""
  return jax.eval_shape(lambda k: init_variables(module, k, image_shape), jax.random.key(0))
