"""Process-wide XLA settings, which must be chosen before JAX starts its backends.

`configure_cpu()` appends this project's XLA:CPU flags to `XLA_FLAGS` (flags the user set
keep their values) when the process will compute on the CPU and JAX's backends are not
running yet. `python -m reviewkd_jax.benchmark` calls it first thing (`--nocpu_defaults`
skips it); `main.py` does not, since the flag only matters once the models place
optimisation barriers, which they do not yet. See `CPU_FLAGS` for what is set and what was
measured.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from absl import logging

# XLA:CPU flags applied by `configure_cpu()`, measured on the ReviewKD train step
# (benchmarks/xla_cpu_ab_*.json; jaxlib 0.10.2, 2-core AMD EPYC):
# - `--xla_disable_hlo_passes=cse_barrier_expander`: keeps `jax.lax.optimization_barrier`
#   through XLA:CPU's fusion pass (it is otherwise deleted first). With barriers on the
#   residual blocks' outputs, the fusion pass stops re-computing whole chains of blocks'
#   BatchNorm/add/ReLU inside the transposing copies that feed weight-gradient convolutions,
#   which read several inputs at a 64 KB stride and dominate the CPU profile. On its own
#   (no barriers in the model) the flag changes nothing.
# Not set, because they did not help: `--xla_cpu_experimental_onednn_custom_call=true`
# compiles to the same program as the default here (no oneDNN custom call appears in the
# HLO, losses equal to the bit); `--xla_cpu_use_fusion_emitters=false` was 7-12% slower;
# fast math and 512-bit vectors were within the noise.
CPU_FLAGS: tuple[str, ...] = ('--xla_disable_hlo_passes=cse_barrier_expander',)

_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


def _backends_running() -> bool:
  """Returns True once any JAX backend exists (XLA_FLAGS is then read already)."""
  if 'jax' not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def cpu_only() -> bool:
  """Returns True if JAX will compute on the CPU: JAX_PLATFORMS says so, or no GPU/TPU
  plugin is installed (XLA_FLAGS reach every backend, so GPU runs are left alone)."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0].strip()


def configure_cpu(flags: tuple[str, ...] | list[str] | None = None, *,
                  force: bool = False) -> list[str]:
  """Adds XLA:CPU flags to XLA_FLAGS unless set already; returns the flags it added.

  Args:
    flags: the flags to apply (default `CPU_FLAGS`), as `--name=value`.
    force: apply them even if a GPU/TPU may be used (default: only for CPU-only runs).
  Does nothing, with a warning, once JAX's backends are initialised (they read XLA_FLAGS
  once). A flag whose name the user already put in XLA_FLAGS keeps the user's value.
  """
  flags = CPU_FLAGS if flags is None else tuple(flags)
  if not force and not cpu_only():
    return []
  current = os.environ.get('XLA_FLAGS', '')
  present = {_flag_name(f) for f in current.split()}
  added = [f for f in flags if _flag_name(f) not in present]
  if not added:
    return []
  if _backends_running():
    logging.warning('configure_cpu() called after JAX initialised its backends; %s not '
                    'applied. Call it before the first JAX computation.', ' '.join(added))
    return []
  os.environ['XLA_FLAGS'] = ' '.join([*current.split(), *added])
  return added
