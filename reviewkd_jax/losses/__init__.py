"""Distillation losses as pure, jit-able functions of NHWC features and logits.

Importing this package pulls in JAX and optax only (never TensorFlow or tfds).

- `hcl`: ReviewKD's hierarchical context loss, sum over levels of
  (MSE + sum_l w_l MSE(pool_l(fs), pool_l(ft))) / (1 + sum_l w_l), l in {4, 2, 1} below the
  map size, w = 1/2, 1/4, 1/8; Chen et al., "Distilling Knowledge via Knowledge Review",
  CVPR 2021.
- `cross_entropy`: mean softmax cross-entropy with integer labels.
- `kd_loss`: KL(softmax(t/T) || softmax(s/T)) * T^2; Hinton et al., 2015.
"""
from reviewkd_jax.losses.logits import cross_entropy, kd_loss
from reviewkd_jax.losses.review import adaptive_avg_pool, hcl, hcl_level

__all__ = ['adaptive_avg_pool', 'cross_entropy', 'hcl', 'hcl_level', 'kd_loss']
