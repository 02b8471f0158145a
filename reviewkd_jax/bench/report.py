"""The benchmark report: the comparison of first-step losses, the targets, the text table."""
from __future__ import annotations

import math

# A step's first losses from the two frameworks on the same weights and batch agree to this
# (float32; bfloat16 runs are reported, not judged).
LOSS_RTOL = 1e-4


def loss_agreement(jax_first: dict, torch_first: dict, *, ce_weight: float) -> dict:
  """Returns the first step's CE, HCL and total loss of both frameworks and their rel. diffs."""
  pairs = {'ce': (jax_first['loss_ce'] / ce_weight if ce_weight else float('nan'),
                  torch_first['ce']),
           'hcl': (jax_first.get('hcl', float('nan')), torch_first['hcl']),
           'loss': (jax_first['loss'], torch_first['loss'])}
  out = {}
  for name, (a, b) in pairs.items():
    rel = abs(a - b) / max(abs(b), 1e-12)
    out[name] = {'jax': a, 'torch': b, 'rel_diff': rel}
  out['max_rel_diff'] = max(v['rel_diff'] for v in out.values() if isinstance(v, dict))
  out['agree'] = out['max_rel_diff'] <= LOSS_RTOL
  out['rtol'] = LOSS_RTOL
  return out


def targets(report: dict) -> list[dict]:
  """Returns the issue's performance targets with the measured value and whether each holds."""
  out = []
  jax_r = report['steps'].get('jax')
  eager = report['steps'].get('torch_eager')
  platform = report['machine']['platform']
  if jax_r and eager:
    speedup = eager['step']['median_ms'] / jax_r['step']['median_ms']
    want = 1.0 if platform == 'cpu' else 2.0
    out.append({'target': f'JAX step >= {want:g}x PyTorch eager ({platform})',
                'value': speedup, 'met': speedup >= want})
  if jax_r and platform != 'cpu':
    out.append({'target': 'compile < 60 s', 'value': jax_r['compile_s'],
                'met': jax_r['compile_s'] < 60})
    if report['config'].get('dataset') == 'imagenet2012' and jax_r['dtype'] == 'bfloat16':
      mfu = jax_r.get('mfu')
      out.append({'target': 'ImageNet bf16 MFU >= 40%', 'value': mfu,
                  'met': mfu is not None and mfu >= 0.40})
  if jax_r:
    for p in report.get('input_pipeline', []):
      if _same_kind(p['dataset'], report['config'].get('dataset', '')):
        # The step's per-host demand: its global images/s over the processes.
        need = jax_r['images_per_s'] / report['machine']['num_processes']
        out.append({'target': f'{p["dataset"]} pipeline images/s per host >= step\'s',
                    'value': p['images_per_s_per_host'] / need,
                    'met': p['images_per_s_per_host'] >= need})
  return out


def _same_kind(pipeline_dataset: str, config_dataset: str) -> bool:
  return config_dataset.startswith(pipeline_dataset[:8])


def _fmt(value, spec: str, scale: float = 1.0, none: str = '-') -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return none
  return format(value * scale, spec)


def _mib(result: dict) -> str:
  mem = result.get('memory', {})
  peak = mem.get('device_peak_bytes', mem.get('compiled_peak_bytes'))
  return _fmt(peak, '.0f', 1 / 2**20)


def format_table(report: dict) -> str:
  """Returns the report as fixed-width text: steps, loss agreement, pipeline, targets."""
  m, c = report['machine'], report['config']
  lines = [
      f"{c['name']}: {c['teacher']} -> {c['model']} ({c['method']}), global batch "
      f"{c['batch_size']}, {c['dtype']}, {c['dataset']}",
      f"{m['device_kind']} x{m['num_devices']} ({m['platform']}), {m['cpu_cores']} CPU cores, "
      f"load {_fmt(m['load_average'][0] if m['load_average'] else None, '.1f')}; "
      f"jax {m['jax']}, XLA_FLAGS='{m['xla_flags']}', step compiler options "
      f"{m.get('step_compiler_options')}",
      '',
      f"{'step':<14}{'compile s':>10}{'median ms':>11}{'p10-p90 ms':>16}{'CPU ms':>9}"
      f"{'img/s':>9}{'peak MiB':>10}{'TFLOP/s':>9}{'MFU':>7}{'vs eager':>10}",
  ]
  eager = report['steps'].get('torch_eager')
  for name, r in report['steps'].items():
    if 'error' in r:
      lines.append(f'{name:<14}failed: {r["error"][:90]}')
      continue
    compile_s = r.get('compile_s', r.get('first_call_s'))
    vs = (eager['step']['median_ms'] / r['step']['median_ms']) if eager else None
    spread = f"{r['step']['p10_ms']:.0f}-{r['step']['p90_ms']:.0f}"
    lines.append(
        f"{name:<14}{_fmt(compile_s, '.1f'):>10}{r['step']['median_ms']:>11.1f}{spread:>16}"
        f"{_fmt(r.get('cpu_step', {}).get('median_ms'), '.0f'):>9}"
        f"{r['images_per_s']:>9.0f}{_mib(r):>10}"
        f"{_fmt(r.get('achieved_flops_per_s'), '.2f', 1e-12):>9}"
        f"{_fmt(r.get('mfu'), '.1%'):>7}{_fmt(vs, '.2f'):>9}x")
  for name, ratio in report.get('speedup', {}).items():
    per_round = ', '.join(f"{r[f'speedup_vs_{name}']:.2f}x (load {r['load_average']:.1f})"
                          for r in report['rounds'])
    lines.append(f'jax speed-up over {name}, interleaved rounds: median {ratio["median"]:.2f}x '
                 f'(min {ratio["min"]:.2f}x, max {ratio["max"]:.2f}x); rounds: {per_round}')
  for warning in report.get('warnings', []):
    lines.append(f'WARNING: {warning}')
  jax_r = report['steps'].get('jax')
  if jax_r:
    lines.append(
        f"jax: {jax_r['pipelined_step_ms']:.1f} ms/step issued back to back, "
        f"{jax_r['recompilations']} recompilations over {jax_r['steps_run']} steps "
        f"({jax_r['epochs_crossed']} epoch boundaries), trace {jax_r['trace_s']:.1f} s, "
        f"{_fmt(jax_r['flops_per_step'], '.1f', 1e-9)} GFLOP/step")
  for name, agreement in report.get('first_step_agreement', {}).items():
    lines.append(
        f"first-step losses jax vs {name} (same weights and batch): "
        + ', '.join(f"{k} {v['jax']:.6f} / {v['torch']:.6f}" for k, v in agreement.items()
                    if isinstance(v, dict))
        + f"; max rel. diff {agreement['max_rel_diff']:.1e}")
  if report.get('input_pipeline'):
    lines += ['', f"{'input pipeline':<16}{'local batch':>12}{'ms/batch':>10}{'img/s/host':>12}"
              f"{'+to device':>12}"]
    for p in report['input_pipeline']:
      lines.append(f"{p['dataset']:<16}{p['local_batch']:>12}{p['host_batch_ms']:>10.1f}"
                   f"{p['images_per_s_per_host']:>12.0f}"
                   f"{_fmt(p.get('images_per_s_per_host_to_device'), '.0f'):>12}")
  if report.get('parts') or report.get('conv'):
    from reviewkd_jax.bench import parts as parts_lib  # pylint: disable=g-import-not-at-top
    lines.append(parts_lib.format_parts(report.get('parts'), report.get('conv')))
  if report.get('targets'):
    lines.append('')
    for t in report['targets']:
      lines.append(f"target {t['target']}: {_fmt(t['value'], '.2f')} "
                   f"({'met' if t['met'] else 'NOT met'})")
  return '\n'.join(lines)
