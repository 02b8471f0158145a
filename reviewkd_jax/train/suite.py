"""Suites: several runs of one config file in order (the offline demos: a teacher, then
students alone and with ReviewKD over several seeds), each in its own folder of the workdir,
then a summary: a table, an optional comparison of groups of runs, and a plot.

Classification runs are scored by top-1 (%), detection runs (`task='detection'`) by COCO
box AP (x100); a suite holds one kind.
"""
from __future__ import annotations

import copy
import json
import statistics

import jax
import ml_collections
from absl import logging
from etils import epath

from reviewkd_jax.train.detection import is_detection, train_detector
from reviewkd_jax.train.trainer import RunResult, SetupError, is_stopped, train_and_evaluate

PLOT_FILE = 'accuracy.png'


def is_suite(config: ml_collections.ConfigDict) -> bool:
  """Returns whether `config` is a suite (it has `runs` and `run_order`)."""
  return 'runs' in config


def train_suite(config: ml_collections.ConfigDict, workdir: str, *,
                devices=None) -> dict[str, RunResult]:
  """Trains `config.runs[name]` for each name of `config.run_order` in `workdir/<name>`.

  '{workdir}' in a run's `teacher_checkpoint` names the suite's workdir, so a run can distil
  from a teacher an earlier run trained. Prints and writes (`summary.json`) the final and
  best top-1 of every run; with `config.groups` (name -> run names) and `config.compare`
  (two group names), also each group's mean and spread and the difference of the two means,
  in one sentence (over the runs of `run_order`: a subset leaves out what it lacks); and
  plots every run's evaluations (`accuracy.png`). A run that stops before its end (SIGTERM,
  preemption, `stop_after_step`) stops the suite there, without a summary; a run that fails
  raises.
  """
  unknown = [name for name in config.run_order if name not in config.runs]
  if unknown:
    raise SetupError(f'config.run_order names {", ".join(map(repr, unknown))}, which this suite '
                     f'does not define; its runs are {", ".join(config.runs)}.')
  results = {}
  for name in config.run_order:
    run = copy.deepcopy(config.runs[name])
    if is_detection(run):
      run.teacher_weights = run.teacher_weights.replace('{workdir}', workdir)
      logging.info('=== %s: %s-FPN (method %s) in %s/%s', name, run.backbone, run.method,
                   workdir, name)
      results[name] = train_detector(run, f'{workdir}/{name}', devices=devices)
    else:
      run.teacher_checkpoint = run.teacher_checkpoint.replace('{workdir}', workdir)
      logging.info('=== %s: %s (method %s) in %s/%s', name, run.model, run.method, workdir,
                   name)
      results[name] = train_and_evaluate(run, f'{workdir}/{name}', devices=devices)
    if is_stopped(results[name]):
      later = config.run_order[list(config.run_order).index(name) + 1:]
      logging.warning('The suite stops with %s, which stopped at step %d of %d%s; rerun with '
                      'the same --workdir to continue.', name, results[name].step,
                      results[name].total_steps,
                      f' ({", ".join(later)} not started)' if later else '')
      return results
  metric = _metric(config)
  summary = {'runs': _run_summaries(config, results)}
  if metric['key'] == 'top1':
    lines = [f'Results on {config.runs[config.run_order[0]].dataset} (eval split), '
             'final / best top-1:']
    for name, row in summary['runs'].items():
      lines.append(f'  {name:<12} {row["who"]:<36} {row["final_top1"]:6.2f}% / '
                   f'{row["best_top1"]:6.2f}%')
  else:
    lines = [f'Results on {config.runs[config.run_order[0]].dataset} (held-out), final box AP'
             ' / mask AP:']
    for name, row in summary['runs'].items():
      lines.append(f'  {name:<12} {row["who"]:<44} {row["final"]:6.2f} / '
                   f'{row["final_mask_ap"]:6.2f}')
  if 'groups' in config:  # over the runs of run_order; a group of none of them is left out
    summary['groups'] = {group: _group_stats([summary['runs'][n]['final'] for n in names
                                              if n in summary['runs']])
                         for group, names in config.groups.items()
                         if any(n in summary['runs'] for n in names)}
    for group, stats in summary['groups'].items():
      lines.append(f'  {group}: {stats["mean"]:.2f}{metric["unit"]} +- {stats["std"]:.2f} '
                   f'(final {metric["name"]}, mean +- standard deviation over {stats["count"]} '
                   'runs)')
  if 'compare' in config and all(g in summary.get('groups', {}) for g in config.compare):
    lines.append(_comparison(config, summary))
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
    (epath.Path(workdir) / 'summary.json').write_text(json.dumps(summary, indent=2))
    _plot(results, epath.Path(workdir) / PLOT_FILE)
  return results


def _metric(config) -> dict:
  """Returns how the suite's runs are scored: top-1 (%) or COCO box AP (x100)."""
  if is_detection(config.runs[config.run_order[0]]):
    return {'key': 'bbox/AP', 'name': 'box AP', 'unit': '', 'scale': 100.0}
  return {'key': 'top1', 'name': 'top-1', 'unit': '%', 'scale': 1.0}


def _run_summaries(config, results: dict) -> dict[str, dict]:
  rows = {}
  for name, result in results.items():
    run = config.runs[name]
    if is_detection(run):
      who = f'{run.backbone}-FPN' + (
          f' + {run.method} from {run.teacher_backbone}' if run.method != 'none' else ' alone')
      final = result.final or {}
      rows[name] = {'who': who, 'model': f'{run.backbone}-FPN', 'method': run.method,
                    'teacher': run.teacher_backbone, 'seed': run.seed,
                    'final': 100 * final.get('bbox/AP', float('nan')),
                    'final_mask_ap': 100 * final.get('segm/AP', float('nan'))}
      continue
    who = run.model + (f' + {run.method} from {run.teacher}' if run.method != 'none' else
                       ' alone')
    final = result.final['top1'] if result.final else float('nan')
    rows[name] = {'who': who, 'model': run.model, 'method': run.method,
                  'teacher': run.teacher, 'seed': run.seed, 'final': final,
                  'final_top1': final,
                  'best_top1': result.best['top1'] if result.best else float('nan')}
  return rows


def _group_stats(values: list[float]) -> dict:
  """Returns mean, sample standard deviation (0 for one value), min, max and count."""
  return {'mean': statistics.fmean(values),
          'std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'min': min(values), 'max': max(values), 'count': len(values)}


def _comparison(config, summary: dict) -> str:
  """Returns the one sentence that says what the suite shows."""
  metric = _metric(config) if 'runs' in config else {'name': 'top-1', 'unit': '%'}
  better, base = (summary['groups'][g] for g in config.compare)
  gain = better['mean'] - base['mean']
  spread = max(better['std'], base['std'])
  verdict = ('more than the spread over seeds' if abs(gain) > spread else
             'within the spread over seeds: no conclusion')
  sentence = (f'{config.compare[0]}: {gain:+.2f} points over {config.compare[1]} (final '
              f'{metric["name"]}, mean over {base["count"]} seeds; {verdict}).')
  if 'teacher' in summary['runs']:
    teacher = summary['runs']['teacher']
    note = f', {config.teacher_note}' if 'teacher_note' in config else ''
    value = teacher.get('final', teacher.get('final_top1'))
    sentence += f' Teacher {teacher["model"]}: {value:.2f}{metric["unit"]}{note}.'
  summary['comparison'] = {'groups': list(config.compare), 'gain': gain, 'spread': spread,
                           'sentence': sentence}
  return sentence


def _plot(results: dict[str, RunResult], path: epath.Path) -> None:
  """Writes every run's held-out top-1 over the epochs (this invocation's evaluations)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('matplotlib is not installed: no %s.', path.name)
    return
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  detection = False
  for name, result in results.items():
    if result.evals:
      detection = 'bbox/AP' in result.evals[0]
      xs = [e['step'] if detection else e['epoch'] for e in result.evals]
      ys = [100 * e['bbox/AP'] if detection else e['top1'] for e in result.evals]
      ax.plot(xs, ys, marker='o', markersize=3, label=name,
              linestyle='-' if not name.startswith('student') else '--')
  ax.set_xlabel('step' if detection else 'epoch')
  ax.set_ylabel('held-out box AP' if detection else 'held-out top-1 (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png')
  plt.close(fig)
