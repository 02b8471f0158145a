"""The accelerator requirement files pin the same JAX as the CPU set (what CI tests)."""
import re

from tests.helpers import ROOT


def _pins(name: str) -> dict[str, str]:
  pins = {}
  for line in (ROOT / name).read_text().splitlines():
    match = re.match(r'^([A-Za-z0-9_.-]+)(\[[a-z0-9,-]+\])?==([^\s#]+)', line.strip())
    if match:
      pins[match.group(1).lower()] = match.group(3)
  return pins


def test_gpu_and_tpu_requirements_pin_the_tested_jax():
  cpu = _pins('requirements.txt')
  assert cpu['jax'] == cpu['jaxlib']
  for name, extra in (('requirements-gpu.txt', 'cuda12'), ('requirements-tpu.txt', 'tpu'),
                      ('requirements-dev.txt', 'tpu')):
    text = (ROOT / name).read_text()
    assert '-r requirements.txt' in text
    assert f'jax[{extra}]=={cpu["jax"]}' in text, name
