"""The paper's comparison methods as trainer methods (`config.method`).

kd, fitnet, at, pkt, rkd, crd and vid as the CRD benchmark (RepDistiller) runs them, whose
CIFAR-100 numbers the paper copies; ofd (Heo et al., ICCV 2019) and dkd (Zhao et al., CVPR
2022) as their authors' code and mdistiller run them. Each trains a `DistillStudent`: the
student backbone plus the method's trainable head (FitNet's regressor, VID's regressors,
CRD's embeddings and memory bank, OFD's connectors; none for kd, at, pkt, rkd and dkd).

Loss: `ce_weight * CE + <method term> (+ kd_weight * KD)`; any method combines with the
logit KD term, as ReviewKD does. The weights and hyperparameters are config fields
(`configs/default.py`), their defaults RepDistiller's `-b` per method (FitNet 100, AT 1000,
PKT 30000, RKD distance 25 / angle 50, CRD 0.8, VID 1), OFD's 1e-3 and DKD's alpha 1, beta 8,
T 4 with a 20-epoch warm-up. RepDistiller's `kd` is `-r 0.1 -a 0.9`: ce_weight 0.1,
kd_weight 0.9 (configs/cifar100_table1.py sets them).

Features follow the benchmark, on `feat = [stem, *stages, pooled]`: FitNet regresses
`feat[fitnet_hint_layer]` (2) in one stage together with CE (RepDistiller's `hint`; its
two-stage variant is not what the tables used), AT and VID use `feat[1:-1]`, PKT, RKD and
CRD `feat[-1]`. OFD uses both networks' pre-ReLU stage maps (`features['preact']`).

CRD's negatives: RepDistiller's CIFAR loader (`CIFAR100InstanceSample`, mode 'exact', the
default of its train_student.py) draws each example's 16384 negatives from the training
examples of *other classes*; that produced the published numbers, so
`crd_negatives='other_class'` is the default ('uniform' is ContrastMemory's own sampler over
all examples). Two differences: RepDistiller draws without replacement (16384 of ~49500),
we draw with replacement (the same distribution per negative; ~15% repeats), and the
memory bank has one row per training example of *this run*, so tiny datasets (mock data,
`train_subset`) clip the negatives to (examples - 1), with a warning. CRD needs dataset
indices: in-memory datasets (cifar100, digits) only.

OFD's margins: the expected negative response of the teacher BatchNorm that feeds each
pre-ReLU map (`ofd_bn_paths`), as its authors' `get_bn_before_relu` chooses it: for ResNets
the last BN of the last block's residual branch (the shortcut is ignored, as in their code),
for WRN the next block's `bn1` and finally the network's `bn1`, for VGG each block's last BN.
The teacher runs with batch statistics in both OFD's and mdistiller's code (`teacher_bn_mode`
is a config field; configs/cifar100_table1.py sets 'batch_stats' for ofd).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from reviewkd_jax import methods as M
from reviewkd_jax.losses import methods as L
from reviewkd_jax.models import create_model
from reviewkd_jax.models.cifar_resnet import CifarResNet
from reviewkd_jax.models.imagenet_resnet import ImageNetResNet
from reviewkd_jax.models.vgg import VGG
from reviewkd_jax.models.wrn import WideResNet
from reviewkd_jax.train import methods as methods_lib

CRD_NEGATIVES = ('other_class', 'uniform')


class DistillStudent(nn.Module):
  """The student backbone plus a method's head; returns (logits, features, head output).

  The head is called as `head(features, train=..., **head_inputs)` with the keyword inputs
  of the train step (`Method.apply_kwargs`); the output is None without a head.
  """
  student: nn.Module
  head: nn.Module | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, **head_inputs):
    """Returns `(logits, features, head output or None)`."""
    logits, features = self.student(x, train=train)
    out = None if self.head is None else self.head(features, train=train, **head_inputs)
    return logits, features, out


class FitNetHead(nn.Module):
  """FitNet's regressor applied to the student's hint feature `feat[hint_layer]`."""
  hint_layer: int
  teacher_channels: int
  teacher_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict, train: bool) -> jax.Array:
    """Returns the regressed hint, shaped like the teacher's."""
    hint = M.benchmark_features(features)[self.hint_layer]
    return M.FitNetRegressor(self.teacher_channels, self.teacher_size, dtype=self.dtype,
                             name='regressor')(hint, train)


class VIDHead(nn.Module):
  """VID's regressors, one per stage (`feat[1:-1]`); returns ([means], [variances])."""
  teacher_channels: Sequence[int]
  teacher_sizes: Sequence[int]
  init_pred_var: float = 5.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict, train: bool) -> tuple[list, list]:
    """Returns the predicted means and variances of the teacher's stage maps."""
    del train
    out = [M.VIDRegressor(c, target_size=s, init_pred_var=self.init_pred_var,
                          dtype=self.dtype, name=f'regressor_{i}')(f)
           for i, (f, c, s) in enumerate(zip(features['stages'], self.teacher_channels,
                                              self.teacher_sizes))]
    return [mu for mu, _ in out], [var for _, var in out]


class OFDHead(nn.Module):
  """OFD's connectors on the student's pre-ReLU stage maps; returns one map per stage."""
  teacher_channels: Sequence[int]
  kernel_size: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict, train: bool) -> list:
    """Returns the connected student maps, with the teacher's channels."""
    return [M.OFDConnector(c, self.kernel_size, dtype=self.dtype, name=f'connector_{i}')(f, train)
            for i, (f, c) in enumerate(zip(features['preact'], self.teacher_channels))]


class CRDStudentHead(nn.Module):
  """CRD's embeddings and memory bank on the pooled features, sampling its own negatives.

  Training passes `teacher_pooled`, the batch's dataset `index` and `labels`, a `key` and,
  for `negatives='other_class'`, the training set's `class_index`. Without them it
  initialises on placeholders, or (outside initialisation) returns None: the module then is
  the backbone alone.
  """
  num_data: int
  teacher_dim: int
  negatives: str = 'other_class'
  feat_dim: int = 128
  num_negatives: int = 16384
  temperature: float = 0.07
  momentum: float = 0.5

  @nn.compact
  def __call__(self, features: dict, train: bool, *, teacher_pooled=None, index=None,
               labels=None, key=None, class_index=None):
    """Returns the (B, K+1) NCE scores `(student-anchored, teacher-anchored)`, or None."""
    del train  # the bank updates whenever the 'memory' collection is mutable
    pooled = features['pooled']
    if teacher_pooled is None:
      if not self.is_initializing():
        return None
      b = pooled.shape[0]
      teacher_pooled = jnp.zeros((b, self.teacher_dim), jnp.float32)
      index = jnp.zeros((b,), jnp.int32)
      contrast_idx = jnp.zeros((b, self.num_negatives + 1), jnp.int32)
    elif self.negatives == 'other_class':
      contrast_idx = M.other_class_contrast_idx(key, index, labels, class_index,
                                                num_negatives=self.num_negatives)
    else:
      contrast_idx = M.uniform_contrast_idx(key, index, num_data=self.num_data,
                                            num_negatives=self.num_negatives)
    return M.CRDHead(self.num_data, self.feat_dim, self.num_negatives, self.temperature,
                     self.momentum, name='crd')(pooled, teacher_pooled, index, contrast_idx)


def feature_shapes(model: nn.Module, image_shape: Sequence[int]) -> dict:
  """Returns the ShapeDtypeStructs of `model`'s features for one image (shape inference)."""

  def run():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(variables, x, train=False)[1]

  return jax.eval_shape(run)


def ofd_bn_paths(model: nn.Module) -> list[str]:
  """Returns the param paths of the teacher BNs before each pre-ReLU stage map (OFD's margins).

  Raises ValueError for a family whose pre-ReLU maps have no such BatchNorm defined here.
  """
  if isinstance(model, (CifarResNet, ImageNetResNet)):
    return [f'layer{s + 1}_{n - 1}/bn{len(model.branch)}'
            for s, n in enumerate(model.stage_sizes)]
  if isinstance(model, WideResNet):
    return ['block2/layer_0/bn1', 'block3/layer_0/bn1', 'bn1']
  if isinstance(model, VGG):
    return [f'block{i}_{3 * (len(widths) - 1) + 1}' for i, widths in enumerate(model.cfg)][1:]
  raise ValueError(
      f'OFD takes its margins from the teacher BatchNorm before each pre-ReLU stage map; '
      f'they are defined for ResNets, WRNs and VGGs, not for {type(model).__name__}. '
      'Choose another teacher or another config.method.')


def _crd_sizes(config: ml_collections.ConfigDict, spec) -> tuple[int, int]:
  """Returns CRD's (num_data, num_negatives): the bank's rows and the clipped K."""
  if spec.num_train < 2:
    raise ValueError(f'CRD needs the training-set size of {spec.name!r} (got '
                     f'{spec.num_train}) for its memory bank.')
  return spec.num_train, min(config.crd_num_negatives, spec.num_train - 1)


def _stage_pairs(name: str, config, student: dict, teacher: dict, kind: str) -> None:
  """Raises ValueError unless student and teacher have as many `kind` maps."""
  if len(student[kind]) != len(teacher[kind]):
    raise ValueError(
        f'{name} pairs the stages one to one, but {config.model} has {len(student[kind])} and '
        f'{config.teacher} {len(teacher[kind])}: choose networks with as many stages.')


# --- Heads: (config, spec, dtype, student features, teacher features) -> module or None ----

def _no_head(config, spec, dtype, student, teacher):
  del config, spec, dtype, student, teacher


def _fitnet_head(config, spec, dtype, student, teacher):
  del spec
  num_maps = len(student['stages']) + 1
  if not 0 <= config.fitnet_hint_layer < num_maps:
    raise ValueError(f'config.fitnet_hint_layer={config.fitnet_hint_layer} must index a map '
                     f'of [stem, *stages]: 0..{num_maps - 1} for {config.model}.')
  hint = M.benchmark_features(teacher)[config.fitnet_hint_layer]
  return FitNetHead(config.fitnet_hint_layer, hint.shape[-1], hint.shape[1], dtype=dtype)


def _at_head(config, spec, dtype, student, teacher):
  del spec, dtype
  _stage_pairs('AT', config, student, teacher, 'stages')


def _vid_head(config, spec, dtype, student, teacher):
  del spec
  _stage_pairs('VID', config, student, teacher, 'stages')
  return VIDHead(tuple(f.shape[-1] for f in teacher['stages']),
                 tuple(f.shape[1] for f in teacher['stages']),
                 init_pred_var=config.vid_init_pred_var, dtype=dtype)


def _ofd_head(config, spec, dtype, student, teacher):
  del spec
  _stage_pairs('OFD', config, student, teacher, 'preact')
  return OFDHead(tuple(f.shape[-1] for f in teacher['preact']),
                 kernel_size=config.ofd_connector_kernel, dtype=dtype)


def _crd_head(config, spec, dtype, student, teacher):
  del dtype, student
  num_data, num_negatives = _crd_sizes(config, spec)
  if num_negatives < config.crd_num_negatives:
    logging.warning('CRD: %s has %d training examples, fewer than crd_num_negatives=%d + 1; '
                    'using %d negatives per example (expected only for tiny or mock data).',
                    spec.name, num_data, config.crd_num_negatives, num_negatives)
  return CRDStudentHead(num_data, teacher['pooled'].shape[-1], config.crd_negatives,
                        feat_dim=config.crd_feat_dim, num_negatives=num_negatives,
                        temperature=config.crd_temperature, momentum=config.crd_momentum)


def _build(head_fn, config, spec, dtype):
  """Returns (DistillStudent with the method's head, teacher)."""
  teacher = create_model(config.teacher, num_classes=spec.num_classes, dtype=dtype)
  student = create_model(config.model, num_classes=spec.num_classes, dtype=dtype)
  head = head_fn(config, spec, dtype, feature_shapes(student, spec.image_shape),
                 feature_shapes(teacher, spec.image_shape))
  return DistillStudent(student, head), teacher


# --- Loss terms: ctx -> ({name: weighted term}, {name: extra log}) -------------------------

def _kd_terms(ctx):
  del ctx
  return {}, {}


def _fitnet_terms(ctx):
  c = ctx.config
  target = M.benchmark_features(ctx.teacher_out[1])[c.fitnet_hint_layer]
  return {'fitnet': L.fitnet_loss(ctx.student_out[2], target, weight=c.fitnet_weight)}, {}


def _at_terms(ctx):
  c = ctx.config
  return {'at': L.at_loss(ctx.student_out[1]['stages'], ctx.teacher_out[1]['stages'],
                          p=c.at_p, weight=c.at_weight)}, {}


def _pkt_terms(ctx):
  return {'pkt': L.pkt_loss(ctx.student_out[1]['pooled'], ctx.teacher_out[1]['pooled'],
                            weight=ctx.config.pkt_weight)}, {}


def _rkd_terms(ctx):
  c = ctx.config
  return {'rkd': L.rkd_loss(ctx.student_out[1]['pooled'], ctx.teacher_out[1]['pooled'],
                            distance_weight=c.rkd_distance_weight,
                            angle_weight=c.rkd_angle_weight)}, {}


def _constant(ctx, name: str):
  """Returns `ctx.constants[name]`, or raises if the step was built without `prepare`."""
  if ctx.constants is None:
    raise ValueError(f'config.method={ctx.config.method!r} needs its per-run constants: build '
                     'the step with make_train_step(constants=method.prepare(...)).')
  return ctx.constants[name]


def _crd_terms(ctx):
  student_scores, teacher_scores = ctx.student_out[2]
  return {'crd': L.crd_loss(student_scores, teacher_scores,
                            num_data=_constant(ctx, 'num_data'),
                            weight=ctx.config.crd_weight)}, {}


def _vid_terms(ctx):
  means, variances = ctx.student_out[2]
  return {'vid': L.vid_loss(means, variances, ctx.teacher_out[1]['stages'],
                            weight=ctx.config.vid_weight)}, {}


def _ofd_terms(ctx):
  return {'ofd': L.ofd_loss(ctx.student_out[2], ctx.teacher_out[1]['preact'],
                            _constant(ctx, 'margins'), weight=ctx.config.ofd_weight)}, {}


def _dkd_terms(ctx):
  c = ctx.config
  epoch = ctx.epoch + 1 if c.dkd_warmup_epochs else None  # mdistiller's epochs are 1-based
  loss = L.dkd_loss(ctx.student_out[0], ctx.teacher_out[0], ctx.batch['label'],
                    alpha=c.dkd_alpha, beta=c.dkd_beta, temperature=c.dkd_temperature,
                    epoch=epoch, warmup_epochs=c.dkd_warmup_epochs)
  logs = {'dkd_warmup': L.dkd_warmup(epoch, c.dkd_warmup_epochs)} if epoch is not None else {}
  return {'dkd': loss}, logs


def _loss_terms(term_fn, ctx: methods_lib.LossContext):
  """Returns the method's terms and logs plus the optional logit KD term."""
  terms, logs = term_fn(ctx)
  kd_terms, kd_logs = methods_lib.logit_kd_terms(ctx)
  return {**terms, **kd_terms}, {**logs, **kd_logs}


# --- Config checks, per-run constants and extra apply arguments ----------------------------

def _check_common(config):
  if config.kd_weight < 0:
    raise ValueError(f'config.kd_weight must be >= 0, got {config.kd_weight}.')


def _check_kd(config):
  if not config.kd_weight > 0:
    raise ValueError("config.method='kd' is ce_weight * CE + kd_weight * KD: set "
                     '--config.kd_weight > 0 (the CRD benchmark uses 0.9 with ce_weight 0.1).')


def _check_crd(config):
  if config.crd_negatives not in CRD_NEGATIVES:
    raise ValueError(f'config.crd_negatives must be one of {CRD_NEGATIVES}, got '
                     f'{config.crd_negatives!r}.')
  if config.crd_num_negatives < 1:
    raise ValueError(f'config.crd_num_negatives must be >= 1, got {config.crd_num_negatives}.')


def _check_ofd(config):
  if config.teacher:
    ofd_bn_paths(create_model(config.teacher))


def _check_dkd(config):
  if config.dkd_warmup_epochs < 0:
    raise ValueError(f'config.dkd_warmup_epochs must be >= 0, got {config.dkd_warmup_epochs}.')


def _prepare_crd(config, spec, *, teacher, teacher_variables, train_labels):
  """Returns {'num_data', 'class_index' (other-class negatives)} for CRD's steps."""
  del teacher, teacher_variables
  if train_labels is None:
    raise ValueError(
        f'CRD keeps one memory-bank row per training example and needs each example\'s '
        f'dataset index, which the streamed {spec.name!r} pipeline does not provide: use an '
        'in-memory dataset (cifar100, digits) or another config.method.')
  num_data, _ = _crd_sizes(config, spec)
  if len(train_labels) != num_data:
    raise ValueError(f'CRD: {len(train_labels)} training labels for a bank of {num_data}.')
  class_index = (M.class_index(train_labels) if config.crd_negatives == 'other_class'
                 else None)
  return {'num_data': num_data, 'class_index': class_index}


def _crd_apply_kwargs(ctx):
  return {'teacher_pooled': ctx.teacher_out[1]['pooled'], 'index': ctx.batch['index'],
          'labels': ctx.batch['label'], 'key': ctx.rng,
          'class_index': _constant(ctx, 'class_index')}


def _prepare_ofd(config, spec, *, teacher, teacher_variables, train_labels):
  """Returns {'margins': per-stage (C,) margins} from the teacher's BatchNorms."""
  del config, spec, train_labels
  return {'margins': M.ofd_margins_from_params(teacher_variables['params'],
                                               ofd_bn_paths(teacher))}


def _register(name: str, head_fn: Callable, term_fn: Callable, check: Callable | None = None,
              **extra) -> None:
  """Registers a comparison method built as `DistillStudent(student, head_fn(...))`."""

  def check_config(config):
    _check_common(config)
    if check is not None:
      check(config)

  methods_lib.register_method(methods_lib.Method(
      name=name, uses_teacher=True, build=functools.partial(_build, head_fn),
      loss_terms=functools.partial(_loss_terms, term_fn),
      backbone=lambda module: module.student,
      backbone_variables=methods_lib.student_variables, check_config=check_config, **extra))


_register('kd', _no_head, _kd_terms, _check_kd)
_register('fitnet', _fitnet_head, _fitnet_terms)
_register('at', _at_head, _at_terms)
_register('pkt', _no_head, _pkt_terms)
_register('rkd', _no_head, _rkd_terms)
_register('crd', _crd_head, _crd_terms, _check_crd, prepare=_prepare_crd,
          apply_kwargs=_crd_apply_kwargs)
_register('vid', _vid_head, _vid_terms)
_register('ofd', _ofd_head, _ofd_terms, _check_ofd, prepare=_prepare_ofd)
_register('dkd', _no_head, _dkd_terms, _check_dkd)

COMPARISON_METHODS = ('kd', 'fitnet', 'at', 'pkt', 'rkd', 'crd', 'vid', 'ofd', 'dkd')
