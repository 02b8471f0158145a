"""Losses on logits: cross-entropy and Hinton's KD term."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  weights: jax.Array | None = None) -> jax.Array:
  """Returns the mean softmax cross-entropy of integer `labels` (float32 scalar).

  `weights` (N,) masks examples (e.g. padding of the last eval batch); the mean is over the
  weighted examples.
  """
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if weights is None:
    return jnp.mean(per_example)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
            temperature: float = 4.0) -> jax.Array:
  """Returns `KL(softmax(t/T) || softmax(s/T)) * T^2`, summed over classes, batch-averaged.

  Hinton et al., "Distilling the Knowledge in a Neural Network", 2015. The teacher side gets
  no gradient.
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.mean(kl) * temperature**2
