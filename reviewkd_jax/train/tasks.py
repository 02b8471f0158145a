"""Which run a config asks for (`config.task`), and what differs between the tasks' runs.

`task_of(config)` is the one place that reads `config.task`: 'classification' (one run of
`trainer`), 'detection' (one run of `detection`) or 'suite' (several runs of one config,
`suite`). `TASKS` holds, per task of a single run, its train function and how a suite names,
scores, summarises and plots its runs, so that `suite.py` and `main.py` name no task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
from absl import logging

from reviewkd_jax.train import detection
from reviewkd_jax.train import trainer

CLASSIFICATION, DETECTION, SUITE = 'classification', 'detection', 'suite'
NAMES = (CLASSIFICATION, DETECTION, SUITE)


def task_of(config: ml_collections.ConfigDict) -> str:
  """Returns `config.task`, checked; a config without it (written before the field existed)
  is read as a suite if it has `runs`, else as classification, with a deprecation warning."""
  if 'task' not in config:
    task = SUITE if 'runs' in config else CLASSIFICATION
    logging.warning("The config sets no config.task: read as %r. Set config.task = %r in the "
                    'config file; configs without it stop working in the next release.',
                    task, task)
    return task
  if config.task not in NAMES:
    raise ValueError(f'config.task={config.task!r} is not a task: choose one of '
                     f'{", ".join(NAMES)}.')
  return config.task


@dataclasses.dataclass(frozen=True)
class Task:
  """What a suite needs to know of one task's runs."""
  name: str
  train: Callable[..., Any]      # (config, workdir, *, devices=None) -> RunResult
  network: Callable[[ml_collections.ConfigDict], str]          # the student, e.g. 'resnet8'
  teacher_network: Callable[[ml_collections.ConfigDict], str]
  scores: Callable[[Any], dict]  # a result's summary columns; 'final' is the one compared
  metric: dict                   # 'key', 'name', 'unit', 'scale' of the compared figure
  header: str                    # the summary table's title, with {dataset}
  row: str                       # one run's line of it, formatted with the summary row
  eval_x: str                    # the evaluations' x axis in the plot: 'epoch' or 'step'
  eval_label: str                # the plot's y label

  def eval_y(self, evaluation: dict) -> float:
    return self.metric['scale'] * evaluation[self.metric['key']]


def _classification_scores(result) -> dict:
  final = result.final['top1'] if result.final else float('nan')
  return {'final': final, 'final_top1': final,
          'best_top1': result.best['top1'] if result.best else float('nan')}


def _detection_scores(result) -> dict:
  final = result.final or {}
  return {'final': 100 * final.get('bbox/AP', float('nan')),
          'final_mask_ap': 100 * final.get('segm/AP', float('nan'))}


TASKS = {
    CLASSIFICATION: Task(
        name=CLASSIFICATION, train=trainer.train_and_evaluate,
        network=lambda run: run.model, teacher_network=lambda run: run.teacher,
        scores=_classification_scores,
        metric={'key': 'top1', 'name': 'top-1', 'unit': '%', 'scale': 1.0},
        header='Results on {dataset} (eval split), final / best top-1:',
        row='  {name:<12} {who:<36} {final_top1:6.2f}% / {best_top1:6.2f}%',
        eval_x='epoch', eval_label='held-out top-1 (%)'),
    DETECTION: Task(
        name=DETECTION, train=detection.train_detector,
        network=lambda run: f'{run.backbone}-FPN',
        teacher_network=lambda run: run.teacher_backbone,
        scores=_detection_scores,
        metric={'key': 'bbox/AP', 'name': 'box AP', 'unit': '', 'scale': 100.0},
        header='Results on {dataset} (held-out), final box AP / mask AP:',
        row='  {name:<12} {who:<44} {final:6.2f} / {final_mask_ap:6.2f}',
        eval_x='step', eval_label='held-out box AP'),
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  """Returns the Task of a single run's config (not a suite's)."""
  name = task_of(config)
  if name == SUITE:
    raise ValueError('A suite is not a single run: config.runs holds its runs, each with its '
                     "own config.task ('classification' or 'detection').")
  return TASKS[name]
