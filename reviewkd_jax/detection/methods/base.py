"""The contract every detection distillation method follows, and its registry.

A detection method is a `DetectionMethod` registered under its name (`config.method` of a
detection config), the counterpart of `distill.base.Method` for detectors:

- `uses_teacher`: a frozen teacher detector is loaded (`teacher_backbone`, `teacher_weights`).
- `build_adapter(config, teacher_channels) -> nn.Module | None`: the method's trainable
  module (its adapter), trained with the student; `teacher_channels` maps each teacher
  feature level ('c2'.., 'p2'..) to its channels. None: the method trains nothing of its own.
- `adapter_inputs(student_features) -> (args, kwargs)`: what the adapter is initialised on,
  given zeros of the student's features.
- `loss_terms(ctx) -> (terms, adapter_state)`: the method's weighted losses
  ({'loss_<name>': scalar}, added to the detector's) and the adapter's updated
  non-parameter collections, computed inside the jitted step.
- `needs_roi_outputs`: the step asks the student's RoI heads for their sampled RoIs and
  class logits (`ctx.roi_outputs`).
- `check_config(config)`: raise ValueError saying what to change; `run_fields`: config fields
  that make two runs of the method different experiments, with the value a checkpoint that
  does not record one implies.

This module imports no method; `reviewkd_jax.detection.methods` imports every module of its
package, each of which registers itself with `register_detection_method`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections

from reviewkd_jax.distill.base import Registry


@dataclasses.dataclass(frozen=True)
class DetectionLossContext:
  """Everything a detection method's loss may use inside the train step."""
  config: ml_collections.ConfigDict
  detector: nn.Module                  # the student RCNN (its static config, e.g. anchors)
  features: Mapping[str, jax.Array]    # the student's backbone and FPN features
  teacher: nn.Module | None            # the frozen teacher RCNN
  teacher_variables: Any
  teacher_features: Mapping[str, jax.Array] | None  # the teacher's, gradient stopped
  batch: dict                          # 'image', 'image_size', 'boxes', 'labels', 'gt_valid'
  roi_outputs: dict | None             # with `needs_roi_outputs`: 'samples', 'class_logits'
  adapter: nn.Module | None
  adapter_params: Any
  adapter_state: dict                  # the adapter's non-parameter collections

  @property
  def adapter_variables(self) -> dict:
    return {'params': self.adapter_params, **self.adapter_state}


def _no_adapter(config, teacher_channels):
  del config, teacher_channels


def _no_inputs(student_features):
  raise ValueError('a method without an adapter has no adapter inputs')


def _no_check(config):
  del config


@dataclasses.dataclass(frozen=True)
class DetectionMethod:
  """A detection distillation method; see the module docstring for each field."""
  name: str
  uses_teacher: bool
  loss_terms: Callable[[DetectionLossContext], tuple[dict, dict]]
  build_adapter: Callable[[ml_collections.ConfigDict, dict], nn.Module | None] = _no_adapter
  adapter_inputs: Callable[[dict], tuple[tuple, dict]] = _no_inputs
  needs_roi_outputs: bool = False
  check_config: Callable[[ml_collections.ConfigDict], None] = _no_check
  run_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY = Registry('detection method', lambda name, known: (
    f'config.method={name!r} is not a detection method; choose one of {", ".join(known)}.'))


def register_detection_method(method: DetectionMethod) -> DetectionMethod:
  """Registers `method` under `method.name` and returns it."""
  return _REGISTRY.register(method)


def list_detection_methods() -> list[str]:
  """Returns the sorted names of the registered detection methods."""
  return _REGISTRY.names()


def get_detection_method(name: str) -> DetectionMethod:
  """Returns the method registered as `name`, or raises ValueError listing the known ones."""
  return _REGISTRY.get(name)
