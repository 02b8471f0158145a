"""The arrays' checksums saved with checkpoints: one per leaf, by path, any dtype; a changed
byte is a mismatch, a checkpoint saved without checksums is read unchecked."""
import jax
import jax.numpy as jnp
import numpy as np

from reviewkd_jax.train import checkpoint


def _tree():
  return {'params': {'w': np.arange(12, dtype=np.float32).reshape(3, 4),
                     'b': jnp.ones(4, jnp.bfloat16)},
          'rng': jax.random.key(0), 'legacy_rng': jax.random.PRNGKey(0), 'step': 7}


def test_every_leaf_has_a_checksum_by_path():
  digests = checkpoint.array_digests(_tree())
  assert set(digests) == {'params/w', 'params/b', 'rng', 'legacy_rng', 'step'}
  assert digests['rng'] == digests['legacy_rng']       # a typed key checks its data
  assert all(len(d) == 8 for d in digests.values())


def test_one_flipped_bit_is_a_mismatch_naming_the_leaf():
  meta = {checkpoint.DIGESTS: checkpoint.array_digests(_tree())}
  assert checkpoint.mismatched_arrays(_tree(), meta) == []
  damaged = _tree()
  w = damaged['params']['w'].copy()
  w.view(np.uint32)[1, 2] ^= 1          # the lowest mantissa bit of one weight
  damaged['params']['w'] = w
  assert checkpoint.mismatched_arrays(damaged, meta) == ['params/w']
  assert checkpoint.mismatched_arrays(damaged, {}) == []   # saved before checksums existed
