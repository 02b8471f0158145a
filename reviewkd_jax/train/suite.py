"""Suites: several runs of one config file in order (the offline demo: teacher, student
alone, student with ReviewKD), each in its own folder of the workdir, then a summary table.
"""
from __future__ import annotations

import copy
import json

import jax
import ml_collections
from absl import logging
from etils import epath

from reviewkd_jax.train.trainer import RunResult, train_and_evaluate


def is_suite(config: ml_collections.ConfigDict) -> bool:
  """Returns whether `config` is a suite (it has `runs` and `run_order`)."""
  return 'runs' in config


def train_suite(config: ml_collections.ConfigDict, workdir: str, *,
                devices=None) -> dict[str, RunResult]:
  """Trains `config.runs[name]` for each name of `config.run_order` in `workdir/<name>`.

  '{workdir}' in a run's `teacher_checkpoint` names the suite's workdir, so a run can distil
  from a teacher an earlier run trained. Prints and writes (`summary.json`) the final and
  best top-1 of every run.
  """
  results = {}
  for name in config.run_order:
    run = copy.deepcopy(config.runs[name])
    run.teacher_checkpoint = run.teacher_checkpoint.replace('{workdir}', workdir)
    logging.info('=== %s: %s (method %s) in %s/%s', name, run.model, run.method, workdir, name)
    results[name] = train_and_evaluate(run, f'{workdir}/{name}', devices=devices)
  lines = [f'Results on {config.runs[config.run_order[0]].dataset} (eval split), '
           'final / best top-1:']
  summary = {}
  for name, result in results.items():
    run = config.runs[name]
    who = run.model + (f' + {run.method} from {run.teacher}' if run.method != 'none' else
                       ' alone')
    final = result.final['top1'] if result.final else float('nan')
    best = result.best['top1'] if result.best else float('nan')
    lines.append(f'  {name:<10} {who:<36} {final:6.2f}% / {best:6.2f}%')
    summary[name] = {'model': run.model, 'method': run.method, 'teacher': run.teacher,
                     'final_top1': final, 'best_top1': best}
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
    (epath.Path(workdir) / 'summary.json').write_text(json.dumps(summary, indent=2))
  return results
