"""'fgfi': one 3x3 conv adapter per FPN level, imitating the teacher's levels where the
anchors overlap a ground-truth box (`distill.imitation_masks`, `FGFIAdapters`, `fgfi_loss`),
times `config.fgfi_weight`."""
from reviewkd_jax.detection import distill
from reviewkd_jax.detection.methods.base import DetectionMethod, register_detection_method


def _build(config, teacher_channels):
  del config
  return distill.FGFIAdapters(out_channels=teacher_channels['p2'])


def _inputs(features):
  return (distill.pyramid(features),), {}


def _terms(ctx):
  levels = distill.pyramid(ctx.features)
  batch = ctx.batch
  masks = distill.imitation_masks(
      ctx.detector.config.rpn.anchors, [f.shape[1:3] for f in levels], batch['boxes'],
      batch['gt_valid'], image_shape=batch['image'].shape[1:3])
  loss = distill.fgfi_loss(ctx.adapter.apply(ctx.adapter_variables, levels),
                           distill.pyramid(ctx.teacher_features), masks,
                           weight=ctx.config.fgfi_weight)
  return {'loss_fgfi': loss}, ctx.adapter_state


register_detection_method(DetectionMethod(
    name='fgfi', uses_teacher=True, build_adapter=_build, adapter_inputs=_inputs,
    loss_terms=_terms))
