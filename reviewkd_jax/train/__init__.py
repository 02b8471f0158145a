"""The training system: `train_and_evaluate(config, workdir)` and its parts.

- `trainer`: the run (data, teacher, loop, evaluation, checkpoints, logs) and config checks.
- `methods`: training methods by name (`config.method`): 'none', 'reviewkd'; the extension
  point for other distillation methods.
- `comparison_methods`: the paper's comparison methods (kd, fitnet, at, pkt, rkd, crd, vid,
  ofd, dkd) registered through that extension point.
- `step`: the jitted train and eval steps over a device mesh.
- `state`: TrainState, PyTorch-style SGD, the mesh and shardings.
- `schedules`: the epoch-based learning rate and loss-weight warm-up.
- `checkpoint`: orbax checkpoints for resuming and the labelled best/final models.
- `teacher`: loading a frozen teacher from PyTorch or from this project's checkpoints.
- `progress`: metric logging with steps/s, images/s, ETA and the NaN check.
"""
from reviewkd_jax.train.methods import (LossContext, Method, get_method, list_methods,
                                        register_method)
from reviewkd_jax.train.trainer import RunResult, check_config, train_and_evaluate

__all__ = ['LossContext', 'Method', 'RunResult', 'check_config', 'get_method', 'list_methods',
           'register_method', 'train_and_evaluate']
