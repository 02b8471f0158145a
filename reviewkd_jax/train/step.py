"""The classification run's jitted train and eval steps over a mesh (batch sharded on 'data',
state replicated) and its evaluation."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from reviewkd_jax import distill
from reviewkd_jax import losses
from reviewkd_jax import platform
from reviewkd_jax.data import DatasetSpec, InputPipeline, to_global_arrays
from reviewkd_jax.models import ModelOutput
from reviewkd_jax.train import schedules
from reviewkd_jax.train.state import TrainState, batch_sharded, jit_train_step, replicated

TEACHER_BN_MODES = ('eval', 'batch_stats')


def normalize(images: jax.Array, spec: DatasetSpec) -> jax.Array:
  """Returns uint8 NHWC `images` as float32 normalised by the dataset's mean and std."""
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def _correct_topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Returns an int32 (N,) that is 1 where `labels` is among the top-k logits."""
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.int32)


def run_teacher(teacher: nn.Module, variables: Any, images: jax.Array,
                bn_mode: str) -> ModelOutput:
  """Returns the frozen teacher's output (logits, features), with no gradient.

  `bn_mode='batch_stats'` normalises with the batch's statistics (the authors' CIFAR script
  never calls `teacher.eval()`); the running statistics are never updated.
  """
  if bn_mode == 'batch_stats':
    out, _ = teacher.apply(variables, images, train=True, mutable=['batch_stats'])
  elif bn_mode == 'eval':
    out = teacher.apply(variables, images, train=False)
  else:
    raise ValueError(f'teacher_bn_mode must be one of {TEACHER_BN_MODES}, got {bn_mode!r}')
  return jax.lax.stop_gradient(out)


def make_classifier_train_step(*, model: nn.Module, teacher: nn.Module | None,
                               method: distill.Method, config: ml_collections.ConfigDict,
                               tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                               steps_per_epoch: int, spec: DatasetSpec, mesh: Mesh,
                               constants: Any = None):
  """Returns `train_step(state, batch, teacher_variables) -> (state, metrics)`, jitted.

  Loss: `ce_weight * CE + sum(method terms)`, all in float32. Epoch-dependent values
  (lambda's warm-up, the lr) are computed from the traced `state.step`, so the step compiles
  once. The state is donated; metrics are replicated float32 scalars. `constants` (the
  method's `prepare` output, host arrays) are closed over and reach the method as
  `ctx.constants`.
  """

  def train_step(state: TrainState, batch: dict, teacher_variables: Any):
    images = normalize(batch['image'], spec)
    labels = batch['label']
    epoch = schedules.epoch_of(state.step, steps_per_epoch)
    dropout_rng, loss_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    teacher_out = None
    if teacher is not None:
      teacher_out = run_teacher(teacher, teacher_variables, images, config.teacher_bn_mode)
    ctx = distill.LossContext(
        config=config, student_out=None, teacher_out=teacher_out, images=images, batch=batch,
        epoch=epoch, rng=loss_rng, constants=constants)
    apply_kwargs = method.apply_kwargs(ctx)
    mutable = list(state.model_state)

    def loss_fn(params):
      variables = {'params': params, **state.model_state}
      result = model.apply(variables, images, train=True, mutable=mutable or False,
                           rngs={'dropout': dropout_rng}, **apply_kwargs)
      out, new_model_state = result if mutable else (result, {})
      logits = out.logits.astype(jnp.float32)
      terms, logs = method.loss_terms(dataclasses.replace(ctx, student_out=out))
      terms = {'ce': config.ce_weight * losses.cross_entropy(logits, labels), **terms}
      return distill.base.total_loss(terms), (terms, logs, logits, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (terms, logs, logits, new_model_state)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        **{f'loss_{k}': v for k, v in terms.items()},
        **logs,
        'top1': 100.0 * jnp.mean(_correct_topk(logits, labels, 1)),
        'top5': 100.0 * jnp.mean(_correct_topk(logits, labels, 5)),
        'lr': lr_schedule(state.step),
    }
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=new_model_state, opt_state=opt_state)
    return new_state, metrics

  return jit_train_step(train_step, mesh,
                        compiler_options=platform.step_compiler_options(mesh.devices.flat))


def make_eval_step(module: nn.Module, spec: DatasetSpec, mesh: Mesh):
  """Returns `eval_step(variables, batch) -> sums` (jitted) for a backbone in eval mode.

  The sums (`top1`, `top5` correct counts, `loss`, `count`) cover the examples with
  `mask == 1` only, so padding never counts.
  """

  def eval_step(variables, batch):
    logits = module.apply(variables, normalize(batch['image'], spec), train=False).logits
    logits = logits.astype(jnp.float32)
    labels, mask = batch['label'], batch['mask']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'top1': jnp.sum(_correct_topk(logits, labels, 1) * mask),
            'top5': jnp.sum(_correct_topk(logits, labels, 5) * mask),
            'loss': jnp.sum(ce * mask), 'count': jnp.sum(mask)}

  rep = replicated(mesh)
  return jax.jit(eval_step, in_shardings=(rep, batch_sharded(mesh)), out_shardings=rep)


def evaluate_classifier(eval_step, variables: Any, pipeline: InputPipeline, mesh: Mesh, *,
                        prefetch: int = 2) -> dict[str, float]:
  """Returns top-1/top-5 (%) and mean loss over the whole eval split, each example once."""
  totals = None
  for batch in to_global_arrays(pipeline.eval_batches(), batch_sharded(mesh),
                                prefetch=prefetch):
    sums = eval_step(variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals['count'])
  if count != pipeline.num_eval:
    raise RuntimeError(f'evaluation counted {count} examples, the split has '
                       f'{pipeline.num_eval}')
  return {'top1': 100.0 * float(totals['top1']) / count,
          'top5': 100.0 * float(totals['top5']) / count,
          'loss': float(totals['loss']) / count, 'count': count}
