"""Micro-benchmark behind the CPU profile finding: a transposing copy that XLA:CPU fuses
with a chain of residual blocks' element-wise work gets slower with every block it reads.

  python benchmarks/transpose_chain.py

x_k = relu(y_k * s + t + x_{k-1}) over k blocks of [128, 32, 32, 16] tensors (the layer-1
maps of a CIFAR ResNet at batch 128), then the [C, H, W, N] transpose that XLA:CPU makes
for a weight-gradient convolution; and the same chain without the transpose.
"""
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def chain(blocks: int, transpose: bool):
  def f(ys, s, t):
    x = jnp.maximum(ys[0] * s + t, 0)
    for y in ys[1:blocks]:
      x = jnp.maximum(y * s + t + x, 0)
    return jnp.transpose(x, (3, 1, 2, 0)) if transpose else x
  return jax.jit(f)


def main():
  ys = [jax.random.normal(k, (128, 32, 32, 16)) for k in jax.random.split(jax.random.key(0), 4)]
  s, t = jnp.full((16,), 1.1), jnp.full((16,), 0.1)
  plain = jax.jit(lambda y: jnp.transpose(y, (3, 1, 2, 0)))
  cases = [('transpose alone', lambda: plain(ys[0]))]
  for n in (1, 2, 3, 4):
    f = chain(n, True)
    cases.append((f'{n}-block chain + transpose', lambda f=f: f(ys, s, t)))
  f = chain(4, False)
  cases.append(('4-block chain, no transpose', lambda: f(ys, s, t)))
  for name, fn in cases:
    jax.block_until_ready(fn())
    times = []
    for _ in range(10):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    print(f'{name:<30} {np.median(times) * 1e3:7.2f} ms')
  print(f'load {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
