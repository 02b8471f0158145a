"""A row of the paper's COCO tables: a student detector distilled from a frozen teacher.

  python main.py --config=configs/coco_distill.py:pair=faster_r18_r101,method=reviewkd \
      --config.weights=resnet18-f37072fd.pth \
      --config.teacher_weights=model_final_f6e8b1.pkl --workdir=/tmp/frcnn_r18_reviewkd

PAIR: faster_r18_r101, faster_r50_r101 (Faster R-CNN; methods reviewkd, kd, fitnet, fgfi
and none, the slides' rows), mask_r18_r101, mask_r50_r101, mask_mv2_r50 (Mask R-CNN; methods
reviewkd and none). The student follows configs/coco_detector.py's recipe (the authors':
batch 8, lr 0.01, 180k iterations, x0.1 at 120k and 160k) from torchvision's ImageNet
weights (`--config.weights`); the teacher is the Detectron2 model-zoo detector named in
`config.teacher_hint` (`--config.teacher_weights`), never trained or saved. ReviewKD's
lambda per pair is the authors' (`configs/*.yaml` of their Detection code): 1.2, 1.0 and
2.0 for boxes, 1.5, 0.8 and 1.0 with masks; KD 20, FitNet 0.1 and FGFI 0.01 as the
supplementary gives them. `config.published` holds the slides' numbers of the row (box AP
for Faster R-CNN, mask AP for Mask R-CNN).
"""
import ml_collections

from configs import args
from configs import coco_detector

# pair: (student model, teacher model, ReviewKD lambda, published AP per method)
PAIRS = {
    'faster_r18_r101': ('faster_rcnn_r18_fpn', 'faster_rcnn_r101_fpn_3x', 1.2,
                        {'none': 33.26, 'kd': 33.97, 'fitnet': 34.13, 'fgfi': 35.44,
                         'reviewkd': 36.75}),
    'faster_r50_r101': ('faster_rcnn_r50_fpn', 'faster_rcnn_r101_fpn_3x', 1.0,
                        {'none': 37.93, 'kd': 38.35, 'fitnet': 38.76, 'fgfi': 39.44,
                         'reviewkd': 40.36}),
    'mask_r18_r101': ('mask_rcnn_r18_fpn', 'mask_rcnn_r101_fpn_3x', 1.5,
                      {'none': 31.25, 'reviewkd': 33.62}),
    'mask_r50_r101': ('mask_rcnn_r50_fpn', 'mask_rcnn_r101_fpn_3x', 0.8,
                      {'none': 35.24, 'reviewkd': 36.98}),
    'mask_mv2_r50': ('mask_rcnn_mv2_fpn', 'mask_rcnn_r50_fpn_3x', 1.0,
                     {'none': 28.37, 'reviewkd': 31.56}),
}
METHODS = ('reviewkd', 'kd', 'fitnet', 'fgfi', 'none')
ARGS = {'pair': tuple(PAIRS), 'method': METHODS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the row `arg`, 'pair=PAIR,method=METHOD', of the slides' COCO tables."""
  fields = args.parse(arg, ARGS, 'configs/coco_distill.py')
  student, teacher, lam, published = PAIRS[fields['pair']]
  method = fields['method']
  if method not in published:
    raise ValueError(
        f'configs/coco_distill.py: the slides report {fields["pair"]} with methods '
        f'{", ".join(published)} only, not {method!r}.')
  config = coco_detector.recipe(student)
  t_backbone, _, _, _, t_weights = coco_detector.DETECTORS[teacher]
  config.method = method
  config.teacher_backbone = t_backbone
  config.teacher_hint = t_weights
  config.reviewkd_weight = lam
  metric = 'segm/AP' if config.mask else 'bbox/AP'
  config.published = {metric: published[method], 'teacher': teacher,
                      'student_alone': published['none']}
  return config
