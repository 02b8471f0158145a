"""ReviewKD in JAX/Flax: backbones with features, ABF + ReviewKD student, HCL and KD losses.

Submodules import independently: `reviewkd_jax.losses` needs only JAX and optax.
"""
__version__ = '0.1.0'
