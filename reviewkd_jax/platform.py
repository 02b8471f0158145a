"""XLA:CPU compiler options of the train step, chosen by measurement; no TPU probe without TPUs.

`step_compiler_options(devices)` returns the options that `train.step.make_classifier_train_step`
compiles its program with when every device of the run is a CPU (per program, through
`jax.jit(..., compiler_options=...)`: nothing process-wide changes, and GPU/TPU programs
get none). `CPU_STEP_OPTIONS` says what each option does and what it was measured at;
`init_compiler_options(devices)` is the detectors' parameter initialisation's (`CPU_INIT_OPTIONS`).
`skip_absent_tpu()` keeps an installed libtpu (the TPU compiler the pre-flight needs) from
probing for TPU chips on a machine that has none.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import pathlib

from absl import logging

# Per-program XLA:CPU options of the classification train step. Measured with
# `python benchmarks/xla_cpu_flags.py` (paired rounds in one process, 2-core AMD EPYC,
# jaxlib 0.10.2, nothing else running; benchmarks/xla_cpu_ab_*.json and README):
# - `xla_disable_hlo_passes=cse_barrier_expander`: keeps the `optimization_barrier` that
#   `models.layers.block_output` puts on every residual block's output through fusion, so
#   XLA:CPU stops re-computing whole chains of blocks' BatchNorm/add/ReLU inside the
#   transposing copies that feed weight-gradient convolutions. Same losses to the bit.
# Measured and not set:
# - `xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT` (convolutions
#   on XLA's multi-threaded Eigen kernels instead of YNNPACK, whose weight-gradient
#   convolutions run on one thread): a further 1.16x on resnet56 -> resnet20 with the
#   barriers, equally accurate per convolution (checked against float64), but its
#   summation order depends on the batch per device, and VID's loss moved by 8e-4 relative
#   between 1 and 8 devices (tests/test_comparison_methods.py allows 2e-4). Add it to this
#   dict before building a step to use it.
# - `xla_cpu_experimental_onednn_custom_call` (the same program here),
#   `xla_cpu_use_fusion_emitters=false` (slower), fast math and 512-bit vectors (noise).
CPU_STEP_OPTIONS: dict[str, str] = {
    'xla_disable_hlo_passes': 'cse_barrier_expander',
}
# The Eigen convolutions above (measured, not set): `CPU_STEP_OPTIONS.update(EIGEN_CONVS)`.
EIGEN_CONVS: dict[str, str] = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
}


@functools.cache
def _accepted(name: str, value: str) -> bool:
  """Returns True if this jaxlib's CPU compiler accepts the option (a tiny program)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
        jax.ShapeDtypeStruct((), 'float32')).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('XLA:CPU option %s=%s not accepted by this jaxlib (%s); compiling '
                    'without it.', name, value, str(e).splitlines()[0][:200])
    return False


def _all_cpus(devices) -> bool:
  devices = list(devices)
  return bool(devices) and all(d.platform == 'cpu' for d in devices)


def step_compiler_options(devices) -> dict[str, str] | None:
  """Returns `CPU_STEP_OPTIONS` (those this jaxlib accepts) if all `devices` are CPUs,
  else None (GPU and TPU programs compile with XLA's defaults)."""
  if not _all_cpus(devices):
    return None
  options = {k: v for k, v in CPU_STEP_OPTIONS.items() if _accepted(k, v)}
  return options or None


# Per-program XLA:CPU option of a detector's parameter initialisation (`init_compiler_options`):
# LLVM's optimisation level 1 instead of the default. The program is mostly random-number
# generation and runs once per run; at level 1 it compiles in less than half the time, and the
# variables came out bit-identical to the default level's (docs/performance.md, "Detection
# set-up").
CPU_INIT_OPTIONS: dict[str, int] = {'xla_backend_optimization_level': 1}


def init_compiler_options(devices) -> dict[str, int] | None:
  """Returns `CPU_INIT_OPTIONS` if all `devices` are CPUs, else None (XLA's defaults)."""
  return dict(CPU_INIT_OPTIONS) if _all_cpus(devices) else None


_GOOGLE_PCI_VENDOR = '0x1ae0'


def tpu_hardware_present() -> bool:
  """Returns True if this machine may have TPU chips: a Google PCI device (what JAX itself
  looks for, by vendor here so that every TPU generation counts) or a TPU device node."""
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      if pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def skip_absent_tpu() -> bool:
  """Restricts JAX to its CPU backend when libtpu is installed but there is nothing else to
  use; returns True if it did. Call it before JAX's first computation.

  JAX initialises its TPU backend whenever libtpu is importable (its CUDA backend only when a
  GPU is visible); on a machine without TPUs libtpu then prints warnings about the missing
  hardware at the first computation. Nothing changes when the user chose platforms
  (JAX_PLATFORMS), when libtpu is not installed, or when the machine may have a TPU or an
  NVIDIA GPU: a real accelerator is never hidden.
  """
  if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
    return False
  if tpu_hardware_present() or glob.glob('/dev/nvidia[0-9]*'):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms:
    return False
  jax.config.update('jax_platforms', 'cpu')
  return True
