"""Distillation losses as pure, jit-able functions of NHWC features and logits.

Importing this package pulls in JAX and optax only (never TensorFlow or tfds). Each loss takes
the student side first, applies `stop_gradient` to the teacher side, and includes its weight.

- `hcl`: ReviewKD's hierarchical context loss, sum over levels of
  (MSE + sum_l w_l MSE(pool_l(fs), pool_l(ft))) / (1 + sum_l w_l), l in {4, 2, 1} below the
  map size, w = 1/2, 1/4, 1/8; Chen et al., "Distilling Knowledge via Knowledge Review",
  CVPR 2021.
- `feature_mse`: sum over levels of mean((fs - ft)^2), HCL without its pyramid (ReviewKD's
  ablations).
- `cross_entropy`: mean softmax cross-entropy with integer labels.
- `kd_loss`: KL(softmax(t/T) || softmax(s/T)) * T^2; Hinton et al., "Distilling the Knowledge
  in a Neural Network", 2015.
- `fitnet_loss`: beta * mean((r(fs) - ft)^2), a trained regressor on a hint layer; Romero et
  al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
- `at_loss`: beta * sum_layers mean((Q_s - Q_t)^2), Q = normalize(mean_c f^2); Zagoruyko &
  Komodakis, "Paying More Attention to Attention", ICLR 2017.
- `pkt_loss`: beta * KL(P_t || P_s) of row-normalised (1 + cos)/2 kernels of the embeddings;
  Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018.
- `rkd_loss`: w_d * smoothL1 of mean-normalised pairwise distances + w_a * smoothL1 of triplet
  angle cosines; Park et al., "Relational Knowledge Distillation", CVPR 2019.
- `crd_loss`: beta * (NCE_s + NCE_t), one positive vs K memory-bank negatives,
  h = exp(v.m/T)/Z against noise K/n; Tian et al., "Contrastive Representation
  Distillation", ICLR 2020.
- `vid_loss`: beta * sum_layers mean(0.5 ((mu(fs) - ft)^2 / var + log var)),
  var = softplus(a) + eps per channel; Ahn et al., "Variational Information Distillation for
  Knowledge Transfer", CVPR 2019.
- `ofd_loss`: w/N * sum_i 2^-(n-1-i) partial L2(C_i(fs), max(ft, margin)) on pre-ReLU maps,
  skipping target <= 0 with fs <= target; Heo et al., "A Comprehensive Overhaul of Feature
  Distillation", ICCV 2019.
- `dkd_loss`: min(epoch/20, 1) * (alpha * TCKD + beta * NCKD), T^2 KL of target/non-target
  binary probabilities plus T^2 KL over the non-target classes; Zhao et al., "Decoupled
  Knowledge Distillation", CVPR 2022.

The trainable pieces some methods need (FitNet's regressor, VID's regressor, CRD's heads and
memory bank, OFD's connector and margins) are linen modules in `reviewkd_jax.distill`,
one module per method.
"""
from reviewkd_jax.losses.logits import cross_entropy, kd_loss
from reviewkd_jax.losses.methods import (at_loss, attention_map, crd_loss, dkd_loss,
                                         dkd_warmup, fitnet_loss, match_spatial, nce_loss,
                                         ofd_loss, ofd_partial_l2, pkt_loss, rkd_loss,
                                         vid_loss)
from reviewkd_jax.losses.review import adaptive_avg_pool, feature_mse, hcl, hcl_level

__all__ = [
    'adaptive_avg_pool', 'at_loss', 'attention_map', 'crd_loss', 'cross_entropy', 'dkd_loss',
    'dkd_warmup', 'feature_mse', 'fitnet_loss', 'hcl', 'hcl_level', 'kd_loss', 'match_spatial',
    'nce_loss', 'ofd_loss', 'ofd_partial_l2', 'pkt_loss', 'rkd_loss', 'vid_loss'
]
