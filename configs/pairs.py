"""The paper's teacher -> student pairs: one row each, the one home of their numbers.

Each paper experiment's file names its row (`configs/cifar100_r56_r20.py` is
`reviewkd_config('r56_r20')`), and configs/cifar100_table1.py takes its pairs and its DKD
betas from the 'Table 1' rows. A row holds what is particular to the pair: the networks
(registered names, `reviewkd_jax.models.list_models()`), lambda and where it comes from, the
ReviewKD fields that differ between pairs, and the paper's top-1 numbers. What every pair of
a dataset shares is its network's recipe (cifar100_baseline.py with the one table of
per-network learning rates, imagenet_baseline.py) plus `SCRIPT_FIELDS` below.

Feature kinds are what the authors' code computes, not what it reads like (see
docs/reviewkd.md, "Feature conventions"). On CIFAR-100 the student distils its stages'
outputs ('stages', post-activation) and the teacher its pre-activation features ('preact').
Their ImageNet ResNets return each stage's output "before the last ReLU" but then apply
`nn.ReLU(inplace=True)` to that very tensor, so ImageNet ResNet features are post-ReLU
('stages') on both sides; their ImageNet MobileNet uses the functional `F.relu`, so its
features really are pre-ReLU ('preact').
"""
import dataclasses
import types
from collections.abc import Mapping

import ml_collections

from configs import cifar100_baseline
from configs import imagenet_baseline

CIFAR100 = 'cifar100'
IMAGENET = 'imagenet2012'

# Where a lambda comes from.
_SCRIPT = "lambda from the authors' script/reviewKD.sh"
_SUPPLEMENTARY = "lambda not in the authors' scripts: the supplementary's general CIFAR value"
_IMAGENET_SCRIPT = "lambda from the authors' ImageNet script"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One teacher -> student pair of the paper; `reviewkd_config(name)` is its experiment."""
  name: str                  # the file: configs/{cifar100|imagenet}_<name>.py
  dataset: str               # config.dataset: CIFAR100 | IMAGENET
  teacher: str               # registered model names (reviewkd_jax.models.list_models())
  student: str
  reviewkd_weight: float     # lambda
  note: str                  # where lambda comes from, and anything unusual
  table: str = ''            # the paper's table that `published` comes from; '' for none
  # Top-1 (%) the paper publishes: 'teacher', 'student' and registered method names.
  published: Mapping[str, float] = dataclasses.field(default_factory=dict)
  mid_channels: int = 0      # ABF width; 0 = min(512, deepest student channels)
  student_features: str = 'stages'
  teacher_features: str = 'preact'
  dkd_beta: float | None = None  # Table 1's DKD column: mdistiller's per-pair BETA

  def __post_init__(self):
    object.__setattr__(self, 'published', types.MappingProxyType(dict(self.published)))

  @property
  def config_file(self) -> str:
    """The experiment's file, as the user types it: 'configs/cifar100_r56_r20.py'."""
    prefix = {CIFAR100: 'cifar100', IMAGENET: 'imagenet'}[self.dataset]
    return f'configs/{prefix}_{self.name}.py'


# Every pair once. Table 1's published columns are those of the paper (its KD, FitNet, AT,
# PKT, RKD, CRD and VID numbers copied from the CRD benchmark, which reports the last epoch;
# ReviewKD's are the authors' best test accuracy over training). dkd_beta is mdistiller's
# configs/cifar100/dkd/<pair>.yaml BETA, 8.0 where the file keeps the default.
TABLE: tuple[Pair, ...] = (
    # CIFAR-100, paper Table 1.
    Pair('r56_r20', CIFAR100, 'resnet56', 'resnet20', reviewkd_weight=0.6, note=_SCRIPT,
         dkd_beta=2.0, table='Table 1', published=dict(
             teacher=72.34, student=69.06, kd=70.66, fitnet=69.21, pkt=70.34, rkd=69.61,
             crd=71.16, at=70.55, vid=70.38, ofd=70.98, reviewkd=71.89)),
    Pair('r110_r32', CIFAR100, 'resnet110', 'resnet32', reviewkd_weight=1.0, note=_SCRIPT,
         dkd_beta=2.0, table='Table 1', published=dict(
             teacher=74.31, student=71.14, kd=73.08, fitnet=71.06, pkt=72.61, rkd=71.82,
             crd=73.48, at=72.31, vid=72.61, ofd=73.23, reviewkd=73.89)),
    Pair('r32x4_r8x4', CIFAR100, 'resnet32x4', 'resnet8x4', reviewkd_weight=5.0, note=_SCRIPT,
         dkd_beta=8.0, table='Table 1', published=dict(
             teacher=79.42, student=72.50, kd=73.33, fitnet=73.50, pkt=73.64, rkd=71.90,
             crd=75.51, at=73.44, vid=73.09, ofd=74.95, reviewkd=75.63)),
    Pair('wrn40x2_wrn16x2', CIFAR100, 'wrn_40_2', 'wrn_16_2', reviewkd_weight=5.0,
         note=_SCRIPT, dkd_beta=6.0, table='Table 1', published=dict(
             teacher=75.61, student=73.26, kd=74.92, fitnet=73.58, pkt=74.54, rkd=73.35,
             crd=75.48, at=74.08, vid=74.11, ofd=75.24, reviewkd=76.12)),
    Pair('wrn40x2_wrn40x1', CIFAR100, 'wrn_40_2', 'wrn_40_1', reviewkd_weight=5.0,
         note=_SCRIPT, dkd_beta=6.0, table='Table 1', published=dict(
             teacher=75.61, student=71.98, kd=73.54, fitnet=72.24, pkt=73.54, rkd=72.22,
             crd=74.14, at=72.77, vid=73.30, ofd=74.33, reviewkd=75.09)),
    Pair('vgg13_vgg8', CIFAR100, 'vgg13', 'vgg8', reviewkd_weight=5.0, note=_SUPPLEMENTARY,
         dkd_beta=6.0, table='Table 1', published=dict(
             teacher=74.64, student=70.36, kd=72.98, fitnet=71.02, pkt=72.88, rkd=71.48,
             crd=73.94, at=71.43, vid=71.23, ofd=73.95, reviewkd=74.84)),
    # CIFAR-100, cross-architecture; paper Table 2's ReviewKD top-1 where it has the pair.
    Pair('wrn40x2_shufflev1', CIFAR100, 'wrn_40_2', 'ShuffleV1', reviewkd_weight=5.0,
         note=_SCRIPT),
    Pair('r32x4_shufflev1', CIFAR100, 'resnet32x4', 'ShuffleV1', reviewkd_weight=5.0,
         note=_SCRIPT, table='Table 2', published=dict(reviewkd=77.45)),
    Pair('r32x4_shufflev2', CIFAR100, 'resnet32x4', 'ShuffleV2', reviewkd_weight=8.0,
         note=_SCRIPT, table='Table 2', published=dict(reviewkd=77.78)),
    Pair('r50_vgg8', CIFAR100, 'ResNet50', 'vgg8', reviewkd_weight=5.0, note=_SUPPLEMENTARY),
    Pair('r50_mobilenetv2', CIFAR100, 'ResNet50', 'MobileNetV2', reviewkd_weight=5.0,
         note=_SUPPLEMENTARY, table='Table 2', published=dict(reviewkd=69.89)),
    Pair('vgg13_mobilenetv2', CIFAR100, 'vgg13', 'MobileNetV2', reviewkd_weight=5.0,
         note=_SUPPLEMENTARY),
    # ImageNet (paper Table 3).
    Pair('r34_r18', IMAGENET, 'resnet34', 'resnet18', reviewkd_weight=1.0,
         note=_IMAGENET_SCRIPT, table='Table 3',
         published=dict(teacher=73.31, student=69.75, kd=70.66, at=70.69, ofd=70.81,
                        crd=71.17, reviewkd=71.61),
         # post-ReLU on both sides (in-place ReLU)
         student_features='stages', teacher_features='stages'),
    Pair('r50_mobilenet', IMAGENET, 'resnet50', 'mobilenet_v1', reviewkd_weight=8.0,
         note=_IMAGENET_SCRIPT, table='Table 3', mid_channels=256,
         published=dict(teacher=76.16, student=68.87, kd=68.58, at=69.56, ofd=71.25,
                        crd=71.37, reviewkd=72.56),
         # MobileNet pre-ReLU (F.relu), ResNet50 post-ReLU (in-place ReLU)
         student_features='preact', teacher_features='stages'),
)

# What each dataset's ReviewKD script sets beyond its network's recipe and the row.
SCRIPT_FIELDS = {
    # Lambda warms up over the first 20 epochs: default.py's reviewkd_warmup_epochs.
    CIFAR100: dict(teacher_bn_mode='batch_stats'),  # the authors never call teacher.eval()
    IMAGENET: dict(teacher_bn_mode='eval',           # the authors call teacher.eval()
                   reviewkd_warmup_epochs=0),        # no warm-up on ImageNet
}
_RECIPES = {CIFAR100: cifar100_baseline.recipe, IMAGENET: imagenet_baseline.recipe}


def names(table: str | None = None) -> tuple[str, ...]:
  """Returns the pairs' names in TABLE order, those of `table` (e.g. 'Table 1') if given."""
  return tuple(p.name for p in TABLE if table is None or p.table == table)


def get(name: str) -> Pair:
  """Returns the row `name`, or raises ValueError listing the names."""
  for pair in TABLE:
    if pair.name == name:
      return pair
  raise ValueError(f'Unknown pair {name!r}; configs/pairs.py has {", ".join(names())}.')


def reviewkd_config(name: str) -> ml_collections.ConfigDict:
  """Returns ReviewKD for the pair `name` as the authors run it: the student's recipe, the
  dataset's SCRIPT_FIELDS and the row's fields."""
  pair = get(name)
  config = _RECIPES[pair.dataset](pair.student)
  config.method = 'reviewkd'
  config.teacher = pair.teacher
  config.reviewkd_weight = pair.reviewkd_weight
  config.mid_channels = pair.mid_channels
  config.student_features = pair.student_features
  config.teacher_features = pair.teacher_features
  config.update(SCRIPT_FIELDS[pair.dataset])
  return config
