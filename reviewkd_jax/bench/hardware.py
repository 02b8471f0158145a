"""The machine: peak FLOP/s of known accelerators (for MFU), device memory, a description."""
from __future__ import annotations

import os
import platform

import jax

# Dense peak FLOP/s per JAX device, from the vendors' datasheets: (bfloat16, float32).
# float32 is the TF32 tensor-core peak on NVIDIA GPUs: XLA runs float32 convolutions and
# matmuls in TF32 at JAX's default precision. TPUs run float32 through bf16 passes; their
# float32 entry is the bf16 peak / 3 (the default 'bf16_3x' algorithm), so MFU there is a
# lower bound. Matched as a substring of `device.device_kind`, first match wins.
PEAK_FLOPS = (
    ('H200', 989e12, 494.5e12),
    ('H100 PCIe', 756e12, 378e12),
    ('H100', 989e12, 494.5e12),       # SXM5 (device_kind 'NVIDIA H100 80GB HBM3')
    ('GH200', 989e12, 494.5e12),
    ('A100', 312e12, 156e12),
    ('L4', 121e12, 60e12),
    ('TPU v6 lite', 918e12, 918e12 / 3),
    ('TPU v5 lite', 197e12, 197e12 / 3),
    ('TPU v5', 459e12, 459e12 / 3),   # v5p
    ('TPU v4', 275e12, 275e12 / 3),
)


def peak_flops_per_device(dtype: str) -> float | None:
  """Returns the dense peak FLOP/s of one local device for `dtype`, or None if unknown."""
  kind = jax.devices()[0].device_kind
  for name, bf16, f32 in PEAK_FLOPS:
    if name in kind:
      return bf16 if dtype == 'bfloat16' else f32
  return None


def utilization(flops_per_step: float | None, step_s: float, dtype: str,
                num_devices: int) -> dict:
  """Returns achieved FLOP/s and MFU (against every device's peak; None where unknown)."""
  achieved = flops_per_step / step_s if flops_per_step else None
  peak = peak_flops_per_device(dtype)
  mfu = achieved / (peak * num_devices) if achieved and peak else None
  return {'achieved_flops_per_s': achieved, 'peak_flops_per_s': peak * num_devices if peak
          else None, 'mfu': mfu}


def device_memory() -> dict:
  """Returns the first device's peak/in-use/limit bytes where the backend reports them."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats:
    return {}
  keys = {'peak_bytes_in_use': 'device_peak_bytes', 'bytes_in_use': 'device_bytes_in_use',
          'bytes_limit': 'device_bytes_limit'}
  return {ours: int(stats[theirs]) for theirs, ours in keys.items() if theirs in stats}


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe() -> dict:
  """Returns what the figures depend on: devices, CPU, cores, load, library versions."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'num_devices': len(devices),
      'num_processes': jax.process_count(),
      'cpu': _cpu_model(),
      'cpu_cores': os.cpu_count(),
      'load_average': list(load) if load else None,
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'python': platform.python_version(),
  }
