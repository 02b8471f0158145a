"""The parts of `python -m reviewkd_jax.bench`: each measures one thing and returns a dict.

- `jax_step`: the real distillation train step of a config
  (`train.step.make_classifier_train_step`) on synthetic on-device batches: compile time,
  step-time distribution, memory, FLOPs.
- `rounds`: the steps of several runners timed in interleaved rounds, and their speedups.
- `torch_step`: the same pair and computation as the authors' PyTorch training loop runs it
  (eager, and `torch.compile` where it works), on the same initial weights.
- `input_pipeline`: images/s of this project's input pipeline per host, on synthetic
  CIFAR-100 arrays and synthetic ImageNet-sized JPEGs.
- `hardware`: peak FLOP/s of known accelerators (for MFU) and device memory statistics.
- `report`: the table and the JSON.
"""
