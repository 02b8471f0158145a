"""The comparison methods of the ReviewKD paper's tables, as pure jit-able losses.

Every loss takes the student side first, the teacher side second, and keyword-only
hyperparameters whose defaults are those of the CRD benchmark (RepDistiller, which the
ReviewKD paper copies) or, for OFD and DKD, of their own papers' code. Each already includes
its weight (the benchmark's `-b`), so a train step adds `CE + loss(...)`. The teacher side
always passes through `stop_gradient`.

Features are NHWC maps or (N, D) embeddings. In the CRD benchmark the feature list is
`feat = [stem, *stages, pooled]` (`reviewkd_jax.distill.base.benchmark_features`): FitNet uses
`feat[2]`, AT and VID `feat[1:-1]`, PKT, RKD and CRD `feat[-1]`; OFD uses the stages'
pre-ReLU maps (`features['preact']`).

The trainable parts (FitNet's regressor, VID's regressor and variance, CRD's embeddings and
memory bank, OFD's connectors and margins) are linen modules in `reviewkd_jax.distill`.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from reviewkd_jax.losses.logits import kd_loss
from reviewkd_jax.losses.review import adaptive_avg_pool

Features = Union[jax.Array, Sequence[jax.Array]]

_sg = jax.lax.stop_gradient


def _as_list(x: Features) -> list[jax.Array]:
  return [x] if hasattr(x, 'shape') else list(x)


def _check_pairs(name: str, s: list, t: list) -> None:
  if len(s) != len(t):
    raise ValueError(f'{name}: got {len(s)} student and {len(t)} teacher features')


def match_spatial(fs: jax.Array, ft: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns `(fs, ft)` with the larger NHWC map adaptive-average-pooled to the smaller's size.

  This is how RepDistiller's AT and VID pair maps of different resolutions.
  """
  hs, ht = fs.shape[1], ft.shape[1]
  if hs > ht:
    fs = adaptive_avg_pool(fs, (ht, ft.shape[2]))
  elif hs < ht:
    ft = adaptive_avg_pool(ft, (hs, fs.shape[2]))
  return fs, ft


def _l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Returns `x / max(||x||, eps)` (PyTorch's `F.normalize`), with finite gradients at 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Returns ||x|| along `axis` (keepdims), with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Returns PyTorch's `smooth_l1_loss(a, b)` (beta 1, mean)."""
  d = jnp.abs(a - b)
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


# ----------------------------------------------------------------------------- FitNet


def fitnet_loss(student_feat: jax.Array, teacher_feat: jax.Array, *,
                weight: float = 100.0) -> jax.Array:
  """Returns `weight * mean((r(fs) - ft)^2)`, FitNet's hint loss (a float32 scalar).

  `student_feat` is the regressor's output (`methods.FitNetRegressor` applied to the
  student's hint layer, `feat[2]` in the benchmark), of the teacher feature's shape.
  Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
  """
  if student_feat.shape != teacher_feat.shape:
    raise ValueError(f'fitnet_loss: shapes {student_feat.shape} and {teacher_feat.shape} '
                     'differ; apply FitNetRegressor to the student feature first')
  fs = student_feat.astype(jnp.float32)
  ft = _sg(teacher_feat.astype(jnp.float32))
  return weight * jnp.mean(jnp.square(fs - ft))


# ----------------------------------------------------------------------------- AT


def attention_map(feat: jax.Array, *, p: float = 2.0) -> jax.Array:
  """Returns AT's map of NHWC `feat`: l2-normalised `mean_c(f^p)`, flattened to (N, H*W)."""
  a = jnp.mean(jnp.power(feat.astype(jnp.float32), p), axis=-1)
  return _l2_normalize(a.reshape(a.shape[0], -1))


def at_loss(student_feats: Features, teacher_feats: Features, *, p: float = 2.0,
            weight: float = 1000.0) -> jax.Array:
  """Returns `weight * sum_layers mean((Q_s - Q_t)^2)` with `Q = normalize(mean_c f^p)`.

  One term per (student, teacher) pair, e.g. `feat[1:-1]` (every stage output); the larger
  map of a pair is adaptive-average-pooled to the smaller one's size first.
  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
  """
  s_list, t_list = _as_list(student_feats), _as_list(teacher_feats)
  _check_pairs('at_loss', s_list, t_list)
  total = jnp.zeros((), jnp.float32)
  for fs, ft in zip(s_list, t_list):
    fs, ft = match_spatial(fs, _sg(ft))
    total = total + jnp.mean(jnp.square(attention_map(fs, p=p) - attention_map(ft, p=p)))
  return weight * total


# ----------------------------------------------------------------------------- PKT


def _pkt_probabilities(x: jax.Array, eps: float) -> jax.Array:
  """Returns PKT's row-normalised cosine-similarity kernel of (N, D) `x`."""
  x = x / (_safe_norm(x) + eps)
  x = jnp.where(jnp.isnan(x), 0.0, x)
  sim = (jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) + 1.0) / 2.0
  return sim / jnp.sum(sim, axis=1, keepdims=True)


def pkt_loss(student_feat: jax.Array, teacher_feat: jax.Array, *, weight: float = 30000.0,
             eps: float = 1e-7) -> jax.Array:
  """Returns `weight * mean(P_t log(P_t / P_s))`, PKT's KL between cosine kernels.

  `P[i, j] = (1 + cos(x_i, x_j)) / 2`, normalised over j; inputs are (N, D) embeddings
  (`feat[-1]`, the pooled feature) or maps, flattened per example.
  Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018.
  """
  ps = _pkt_probabilities(_flat(student_feat), eps)
  pt = _pkt_probabilities(_sg(_flat(teacher_feat)), eps)
  return weight * jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


# ----------------------------------------------------------------------------- RKD


def _pairwise_distances(e: jax.Array, eps: float) -> jax.Array:
  """Returns the (N, N) Euclidean distances of the rows of `e` (diagonal exactly 0)."""
  sq = jnp.sum(jnp.square(e), axis=1)
  prod = jnp.matmul(e, e.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * prod, eps))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _mean_normalized_distances(e: jax.Array, eps: float) -> jax.Array:
  d = _pairwise_distances(e, eps)
  positive = d > 0
  mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.sum(positive)
  return d / mean


def _angles(e: jax.Array) -> jax.Array:
  """Returns cos of the angle at every anchor i between (e_j - e_i) and (e_k - e_i), (N^3,)."""
  diff = _l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
  return jnp.einsum('ijd,ikd->ijk', diff, diff,
                    precision=jax.lax.Precision.HIGHEST).reshape(-1)


def rkd_loss(student_feat: jax.Array, teacher_feat: jax.Array, *,
             distance_weight: float = 25.0, angle_weight: float = 50.0,
             eps: float = 1e-12) -> jax.Array:
  """Returns `w_d * smoothL1(psi_D(s), psi_D(t)) + w_a * smoothL1(psi_A(s), psi_A(t))`.

  psi_D: pairwise distances over their mean (positive entries); psi_A: cosines of every
  triplet's angle. Inputs are (N, D) embeddings (`feat[-1]`) or maps, flattened.
  Park et al., "Relational Knowledge Distillation", CVPR 2019.
  """
  s = _flat(student_feat)
  t = _sg(_flat(teacher_feat))
  loss_d = _smooth_l1(_mean_normalized_distances(s, eps), _mean_normalized_distances(t, eps))
  loss_a = _smooth_l1(_angles(s), _angles(t))
  return distance_weight * loss_d + angle_weight * loss_a


# ----------------------------------------------------------------------------- CRD


def nce_loss(probs: jax.Array, *, num_data: int, eps: float = 1e-7) -> jax.Array:
  """Returns CRD's NCE loss of (B, K+1) scores whose column 0 is the positive pair.

  `-(sum_b log(P_pos / (P_pos + K/n)) + sum_{b,k} log((K/n) / (P_neg + K/n))) / B`, with
  noise distribution 1/n over the `num_data` training examples.
  """
  m = probs.shape[1] - 1
  mpn = m / float(num_data)
  p_pos, p_neg = probs[:, 0], probs[:, 1:]
  log_d1 = jnp.log(p_pos / (p_pos + mpn + eps))
  log_d0 = jnp.log(mpn / (p_neg + mpn + eps))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / probs.shape[0]


def crd_loss(student_scores: jax.Array, teacher_scores: jax.Array, *, num_data: int,
             weight: float = 0.8) -> jax.Array:
  """Returns `weight * (NCE(student-anchored) + NCE(teacher-anchored))`, CRD's loss.

  The scores are the two (B, K+1) outputs of `methods.CRDHead` on the pooled features
  `feat[-1]`; gradients reach the student and both embedding heads, never the memory.
  Tian et al., "Contrastive Representation Distillation", ICLR 2020.
  """
  return weight * (nce_loss(student_scores.astype(jnp.float32), num_data=num_data)
                   + nce_loss(teacher_scores.astype(jnp.float32), num_data=num_data))


# ----------------------------------------------------------------------------- VID


def vid_loss(pred_means: Features, pred_vars: Features, teacher_feats: Features, *,
             weight: float = 1.0) -> jax.Array:
  """Returns `weight * sum_layers mean(0.5 * ((mu - t)^2 / var + log var))`, VID's NLL.

  `(mu, var)` are `methods.VIDRegressor`'s outputs for each student feature (`feat[1:-1]`);
  a teacher map larger than `mu` is adaptive-average-pooled to its size.
  Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.
  """
  mus, variances, targets = (_as_list(pred_means), _as_list(pred_vars),
                             _as_list(teacher_feats))
  _check_pairs('vid_loss', mus, targets)
  _check_pairs('vid_loss', variances, targets)
  total = jnp.zeros((), jnp.float32)
  for mu, var, ft in zip(mus, variances, targets):
    mu = mu.astype(jnp.float32)
    ft = _sg(ft.astype(jnp.float32))
    if ft.shape[1] > mu.shape[1]:
      ft = adaptive_avg_pool(ft, (mu.shape[1], mu.shape[2]))
    var = jnp.broadcast_to(var.astype(jnp.float32), mu.shape)
    total = total + jnp.mean(0.5 * (jnp.square(mu - ft) / var + jnp.log(var)))
  return weight * total


# ----------------------------------------------------------------------------- OFD


def ofd_partial_l2(student_feat: jax.Array, teacher_feat: jax.Array,
                   margin: jax.Array) -> jax.Array:
  """Returns OFD's partial L2 summed over all elements (a float32 scalar).

  The target is `max(t, margin)`; positions where the target is <= 0 and the student is
  already below it are skipped (the teacher's ReLU would zero both).
  """
  fs = student_feat.astype(jnp.float32)
  target = jnp.maximum(_sg(teacher_feat.astype(jnp.float32)), margin.astype(jnp.float32))
  keep = (fs > target) | (target > 0)
  return jnp.sum(jnp.where(keep, jnp.square(fs - target), 0.0))


def ofd_loss(student_feats: Features, teacher_feats: Features, margins: Features, *,
             weight: float = 1e-3) -> jax.Array:
  """Returns `weight / N * sum_i 2^-(n-1-i) partialL2(C_i(fs_i), max(ft_i, m_i))`, OFD's loss.

  `student_feats` are the connector outputs (`methods.OFDConnector` on the student's
  pre-ReLU stage maps), `teacher_feats` the teacher's pre-ReLU stage maps
  (`features['preact']`), `margins` the per-channel (C,) margins of
  `methods.ofd_margin`. Shallow to deep; the deepest pair has weight 1. A teacher map of
  another size is adaptive-average-pooled to the student's (as mdistiller does). The weight
  is 1e-3 on CIFAR-100 and 1e-4 on ImageNet in the authors' code.
  Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.
  """
  s_list, t_list, m_list = (_as_list(student_feats), _as_list(teacher_feats),
                            _as_list(margins))
  _check_pairs('ofd_loss', s_list, t_list)
  _check_pairs('ofd_loss', m_list, t_list)
  n = len(s_list)
  total = jnp.zeros((), jnp.float32)
  for i, (fs, ft, m) in enumerate(zip(s_list, t_list, m_list)):
    if ft.shape[1:3] != fs.shape[1:3]:
      ft = adaptive_avg_pool(ft, (fs.shape[1], fs.shape[2]))
    total = total + ofd_partial_l2(fs, ft, m) / 2.0 ** (n - 1 - i)
  return weight * total / s_list[0].shape[0]


# ----------------------------------------------------------------------------- DKD


def dkd_warmup(epoch, warmup_epochs: int = 20):
  """Returns DKD's loss multiplier `min(epoch / warmup_epochs, 1)` (mdistiller's epochs are
  1-based, so its first epoch is weighted 1/20)."""
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             epoch=None, warmup_epochs: int = 20) -> jax.Array:
  """Returns `warmup * (alpha * TCKD + beta * NCKD)`, decoupled KD (a float32 scalar).

  TCKD is `T^2 KL` between the binary (target, non-target) probabilities of `softmax(z/T)`;
  NCKD is `T^2 KL` between the softmaxes over the non-target classes (the target logit is
  pushed down by 1000 / T); both batch-averaged. `epoch` (1-based, as mdistiller counts;
  None: no warm-up) scales the loss by `min(epoch / warmup_epochs, 1)`.
  Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
  """
  s = student_logits.astype(jnp.float32)
  t = _sg(teacher_logits.astype(jnp.float32))
  gt = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.float32)

  def binary(logits):
    p = jax.nn.softmax(logits / temperature, axis=-1)
    p_target = jnp.sum(p * gt, axis=-1)
    p_other = jnp.sum(p * (1.0 - gt), axis=-1)
    return jnp.stack([p_target, p_other], axis=-1)

  b_s, b_t = binary(s), binary(t)
  kl = jnp.sum(jax.scipy.special.xlogy(b_t, b_t) - b_t * jnp.log(b_s), axis=-1)
  tckd = jnp.mean(kl) * temperature**2
  # Subtracting 1000 * T from the target logit is the reference's `z / T - 1000 * gt_mask`.
  mask = 1000.0 * temperature * gt
  nckd = kd_loss(s - mask, t - mask, temperature=temperature)
  loss = alpha * tckd + beta * nckd
  if epoch is not None:
    loss = dkd_warmup(epoch, warmup_epochs) * loss
  return loss
