"""Where a config's train step spends its time on XLA:CPU, by kind of compiled operation.

  python benchmarks/cpu_profile.py --config=configs/cifar100_r56_r20.py --out=/tmp/prof
  python benchmarks/cpu_profile.py --model=resnet20 --out=/tmp/prof   # a backbone alone

Traces two steps with `jax.profiler`, sums the XLA:CPU thunk events per kind (the fusion
name without its number: `ynn_fusion` = YNNPACK convolutions, `transpose_copy_fusion` =
layout copies, `add_maximum_fusion` = element-wise work, ...) and lists the slowest
transposing copies with the number of full-size tensors each one reads: a copy that reads
many is a chain of element-wise producers (BatchNorm, residual additions, ReLU) that XLA
fused into it and re-computes for every element, reading each input at a large stride.
Thunk durations are wall time on each XLA thread, so on a busy machine they include time
the thread was not running; compare shares, not absolute values.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _computations(hlo: str) -> dict[str, str]:
  return {m.group(1): m.group(2) for m in
          re.finditer(r'\n%(\S+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}', hlo, re.S)}


def _large_inputs(hlo: str) -> dict[str, int]:
  """Returns, per loop fusion of the entry computation, how many 4-D tensors it reads."""
  comps = _computations(hlo)
  out = {}
  for line in hlo[hlo.index('\nENTRY'):].splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = \S+ fusion\(.*?calls=%(\S+?)[,\s]', line)
    if m:
      body = comps.get(m.group(2), '')
      out[m.group(1)] = len(re.findall(r'= \w+\[\d+,\d+,\d+,\d+\]\S* parameter', body))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/cifar100_r56_r20.py')
  parser.add_argument('--model', default='', help='profile this backbone alone (fwd+bwd)')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--variant', default='shipped',
                      help='a variant of xla_cpu_flags.py (XLA:CPU options, block barriers, '
                           "the earlier code restored), e.g. 'before'")
  parser.add_argument('--out', default='/tmp/reviewkd_cpu_profile')
  parser.add_argument('--top', type=int, default=8)
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import xla_cpu_flags  # pylint: disable=g-import-not-at-top

  from reviewkd_jax import platform  # pylint: disable=g-import-not-at-top
  options, barriers, restored, _ = xla_cpu_flags.VARIANTS[args.variant]
  if args.model:
    from reviewkd_jax.models import create_model  # pylint: disable=g-import-not-at-top
    model = create_model(args.model, num_classes=100)
    x = jax.random.normal(jax.random.key(0), (args.batch_size, 32, 32, 3))
    variables = model.init(jax.random.key(1), x[:1], train=False)

    def loss(params, variables, x):
      out, _ = model.apply({**variables, 'params': params}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.mean(out[0])

    with xla_cpu_flags.variant_code(barriers, restored):
      lowered = jax.jit(jax.grad(loss)).lower(variables['params'], variables, x)
    with xla_cpu_flags.step_options(options):
      compiled = lowered.compile(
          compiler_options=platform.step_compiler_options(jax.devices()))
    run = lambda: compiled(variables['params'], variables, x)
  else:
    from reviewkd_jax.bench import jax_step  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = args.batch_size
    with xla_cpu_flags.step_options(options):
      step = jax_step.build(config, steps_per_epoch=1000)
    with xla_cpu_flags.variant_code(barriers, restored):
      lowered = step.train_step.lower(step.state, step.batch, step.teacher_variables)
    compiled = lowered.compile()
    holder = {'state': step.state}

    def run():
      holder['state'], metrics = compiled(holder['state'], step.batch, step.teacher_variables)
      return holder['state'], metrics

  hlo = compiled.as_text()
  for _ in range(2):
    jax.block_until_ready(run())
  jax.profiler.start_trace(args.out)
  for _ in range(2):
    jax.block_until_ready(run())
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f'{args.out}/**/*.xplane.pb', recursive=True))[-1]
  profile = jax.profiler.ProfileData.from_file(path)
  per_name = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLAEigen'):
        continue
      for event in line.events:
        if not event.name.startswith(('ThunkExecutor', 'end:', 'SlinkyThreadPool')):
          per_name[event.name] += event.duration_ns / 2  # per step
  per_kind = collections.Counter()
  for name, ns in per_name.items():
    per_kind[re.sub(r'\.\d+$', '', name)] += ns
  total = sum(per_kind.values())
  print(f'XLA:CPU thunk time per step, all threads: {total / 1e6:.0f} ms '
        f'(load {os.getloadavg()[0]:.1f})')
  for kind, ns in per_kind.most_common(10):
    print(f'  {ns / 1e6:8.1f} ms  {100 * ns / total:5.1f}%  {kind}')
  large = _large_inputs(hlo)
  print('slowest transposing copies (ms per step, 4-D tensors read):')
  copies = [(ns, n) for n, ns in per_name.items() if n.startswith('transpose_copy_fusion')]
  for ns, name in sorted(copies, reverse=True)[:args.top]:
    print(f'  {ns / 1e6:8.1f} ms  reads {large.get(name, "?")}  {name}')
  multi = sum(1 for v in large.values() if v >= 3)
  print(f'{multi} of {len(large)} fusions read 3 or more 4-D tensors')


if __name__ == '__main__':
  main()
