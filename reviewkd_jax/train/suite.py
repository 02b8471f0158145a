"""Suites: several runs of one config file in order (the offline demos: a teacher, then
students alone and with ReviewKD over several seeds), each in its own folder of the workdir,
then a summary: a table, an optional comparison of groups of runs, and a plot.

A suite holds runs of one task (`config.runs[name].task`); `train.tasks` says how that
task's runs are trained and scored (classification: top-1 in %; detection: COCO box AP x100).
"""
from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time

import jax
import ml_collections
from absl import logging
from etils import epath

from reviewkd_jax.train import progress
from reviewkd_jax.train import tasks
from reviewkd_jax.train.run_core import RunResult, SetupError, is_stopped

PLOT_FILE = 'accuracy.png'
COMPILATION_CACHE = 'compilation_cache'


def is_suite(config: ml_collections.ConfigDict) -> bool:
  """Returns whether `config` is a suite (`config.task == 'suite'`)."""
  return tasks.task_of(config) == tasks.SUITE


def train_suite(config: ml_collections.ConfigDict, workdir: str, *,
                devices=None) -> dict[str, RunResult]:
  """Trains `config.runs[name]` for each name of `config.run_order` in `workdir/<name>`.

  '{workdir}' in a text field of a run (its `teacher_weights`) names the suite's workdir, so
  a run can distil from a teacher an earlier run trained. Prints and writes (`summary.json`)
  the final figure of every run (and the best top-1 of a classification run); with `config.groups` (name -> run names) and `config.compare`
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
  try:
    task = tasks.get_task(config.runs[config.run_order[0]])
    others = [n for n in config.run_order if tasks.get_task(config.runs[n]) is not task]
  except ValueError as e:
    raise SetupError(str(e)) from None
  if others:
    raise SetupError(f'A suite holds runs of one task: {", ".join(others)} are not '
                     f'{task.name} runs like {config.run_order[0]}; make two suites.')
  results = {}
  with _compilation_cache(config, workdir):
    _train_runs(config, task, workdir, devices, results)
  if any(is_stopped(r) for r in results.values()):
    return results  # the suite stopped with that run: no summary
  metric = task.metric
  summary = {'runs': _run_summaries(config, task, results)}
  lines = [task.header.format(dataset=config.runs[config.run_order[0]].dataset)]
  for name, row in summary['runs'].items():
    lines.append(task.row.format(name=name, **row))
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
    lines.append(_comparison(config, summary, metric))
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
    (epath.Path(workdir) / 'summary.json').write_text(json.dumps(summary, indent=2))
    _plot(task, results, epath.Path(workdir) / PLOT_FILE)
  return results


def _train_runs(config, task: tasks.Task, workdir: str, devices, results: dict) -> None:
  """Trains the runs of `config.run_order` in order into `results`, stopping after a run
  that stopped before its end."""
  for name in config.run_order:
    run = copy.deepcopy(config.runs[name])
    for field, value in run.items():
      if isinstance(value, str) and '{workdir}' in value:
        run[field] = value.replace('{workdir}', workdir)
    logging.info('=== %s: %s (method %s) in %s/%s', name, task.network(run), run.method,
                 workdir, name)
    start = time.monotonic()
    results[name] = task.train(run, f'{workdir}/{name}', devices=devices)
    logging.info('=== %s took %s.', name, progress.format_duration(time.monotonic() - start))
    if is_stopped(results[name]):
      later = config.run_order[list(config.run_order).index(name) + 1:]
      logging.warning('The suite stops with %s, which stopped at step %d of %d%s; rerun with '
                      'the same --workdir to continue.', name, results[name].step,
                      results[name].total_steps,
                      f' ({", ".join(later)} not started)' if later else '')
      return


@contextlib.contextmanager
def _compilation_cache(config: ml_collections.ConfigDict, workdir: str):
  """With `config.compilation_cache`, keeps the compiled programs in `workdir/compilation_cache`
  (JAX's persistent cache) while the runs train: the runs of one architecture and settings
  but another seed compile the same programs (model init, train step, evaluation), and then
  load them instead of compiling again, as does a rerun. A cache directory the user set
  (`JAX_COMPILATION_CACHE_DIR`) is kept."""
  if not config.get('compilation_cache') or jax.config.jax_compilation_cache_dir:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.set_cache_dir(str(epath.Path(workdir) / COMPILATION_CACHE))
  compilation_cache.reset_cache()  # the directory is read when the cache first opens
  try:
    yield
  finally:
    compilation_cache.set_cache_dir(None)
    compilation_cache.reset_cache()


def _run_summaries(config, task: tasks.Task, results: dict) -> dict[str, dict]:
  rows = {}
  for name, result in results.items():
    run = config.runs[name]
    network, teacher = task.network(run), task.teacher_network(run)
    who = network + (f' + {run.method} from {teacher}' if run.method != 'none' else ' alone')
    rows[name] = {'who': who, 'model': network, 'method': run.method, 'teacher': teacher,
                  'seed': run.seed, **task.scores(result)}
  return rows


def _group_stats(values: list[float]) -> dict:
  """Returns mean, sample standard deviation (0 for one value), min, max and count."""
  return {'mean': statistics.fmean(values),
          'std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'min': min(values), 'max': max(values), 'count': len(values)}


def _comparison(config, summary: dict, metric: dict | None = None) -> str:
  """Returns the one sentence that says what the suite shows (`metric`: the compared
  figure's name and unit, top-1 in % by default)."""
  metric = metric or tasks.TASKS[tasks.CLASSIFICATION].metric
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


def _plot(task: tasks.Task, results: dict[str, RunResult], path: epath.Path) -> None:
  """Writes every run's held-out figure over the epochs or steps (this call's evaluations)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('matplotlib is not installed: no %s.', path.name)
    return
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for name, result in results.items():
    if result.evals:
      xs = [e[task.eval_x] for e in result.evals]
      ys = [task.eval_y(e) for e in result.evals]
      ax.plot(xs, ys, marker='o', markersize=3, label=name,
              linestyle='-' if not name.startswith('student') else '--')
  ax.set_xlabel(task.eval_x)
  ax.set_ylabel(task.eval_label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png')
  plt.close(fig)
