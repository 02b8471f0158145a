"""The training system: `train_and_evaluate(config, workdir)` and its parts.

- `tasks`: which run a config asks for (`config.task`) and how each task's runs are scored.
- `run_core`: what every run shares (workdir, same-run check, records, stop signal, result).
- `trainer`: one classification run, top to bottom (resume, teacher, loop, evaluation,
  checkpoints, logs).
- `detection`: one detection run (`train_detector`), top to bottom.
- `suite`: several runs of one config in order (the offline demo).
- `setup`: one run's setup from its config (method, modules, optimizer, state, steps), shared
  by the trainer, the benchmark and the tests; the config checks.
- `step`: the jitted train and eval steps over a device mesh.
- `state`: TrainState, PyTorch-style SGD, the mesh and shardings.
- `schedules`: the epoch-based learning rate.
- `checkpoint`: orbax checkpoints for resuming and the labelled best/final models.
- `teacher`: loading a frozen teacher from PyTorch or from this project's checkpoints.
- `progress`: metric logging with steps/s, images/s, ETA and the NaN check.

The methods themselves (what a method adds to the student and its loss) are
`reviewkd_jax.distill`.
"""
from reviewkd_jax.distill import get_method, list_methods
from reviewkd_jax.train.setup import RunSetup, build_run, check_config
from reviewkd_jax.train.suite import is_suite, train_suite
from reviewkd_jax.train.run_core import (EXIT_STOPPED, RunResult, SetupError, is_stopped,
                                         storage_fault)
from reviewkd_jax.train.trainer import train_and_evaluate

__all__ = ['EXIT_STOPPED', 'RunResult', 'RunSetup', 'SetupError', 'build_run', 'check_config',
           'get_method', 'is_stopped', 'is_suite', 'list_methods', 'storage_fault',
           'train_and_evaluate', 'train_suite']
