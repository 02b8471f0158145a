"""The train step's XLA:CPU options: applied on CPU only, kept by the compiled program, and
they change the speed, never what the step computes."""
import types

import jax
import numpy as np

from reviewkd_jax import data
from reviewkd_jax import platform
from reviewkd_jax.bench import jax_step
from reviewkd_jax.train import setup as setup_lib
from reviewkd_jax.train import state as state_lib
from tests.helpers import ONE_DEVICE, tiny_config


def test_options_only_for_cpu_devices():
  assert platform.step_compiler_options(jax.devices()) == platform.CPU_STEP_OPTIONS
  gpu = types.SimpleNamespace(platform='gpu')
  assert platform.step_compiler_options([gpu]) is None
  assert platform.step_compiler_options([*jax.devices(), gpu]) is None
  assert platform.step_compiler_options([]) is None
  assert platform.init_compiler_options(jax.devices()) == platform.CPU_INIT_OPTIONS
  assert platform.init_compiler_options([*jax.devices(), gpu]) is None


def test_an_option_this_jaxlib_refuses_is_left_out(monkeypatch):
  monkeypatch.setitem(platform.CPU_STEP_OPTIONS, 'xla_cpu_no_such_option_for_test', 'true')
  options = platform.step_compiler_options(jax.devices())
  assert 'xla_cpu_no_such_option_for_test' not in options
  assert set(options) == set(platform.CPU_STEP_OPTIONS) - {'xla_cpu_no_such_option_for_test'}


def _step(config, options):
  mesh = state_lib.make_mesh(ONE_DEVICE)
  spec = data.get_spec(config.dataset)
  saved = dict(platform.CPU_STEP_OPTIONS)
  platform.CPU_STEP_OPTIONS.clear()
  platform.CPU_STEP_OPTIONS.update(options)
  try:
    run = setup_lib.build_run(config, spec, mesh=mesh, steps_per_epoch=10)
    train_step = run.train_step()
  finally:
    platform.CPU_STEP_OPTIONS.clear()
    platform.CPU_STEP_OPTIONS.update(saved)
  teacher = None
  if run.teacher is not None:
    teacher = jax_step.random_variables(run.teacher, spec.image_shape, seed=3)
  return run, train_step, teacher, mesh, spec


def test_step_keeps_block_barriers_and_computes_the_same():
  config = tiny_config(method='reviewkd', teacher='resnet8', reviewkd_warmup_epochs=0,
                       batch_size=8)
  batch = jax_step.synthetic_batch(data.get_spec('cifar100'), 8)
  results = {}
  for name, options in (('shipped', dict(platform.CPU_STEP_OPTIONS)), ('xla_defaults', {})):
    run, train_step, teacher, mesh, _ = _step(config, options)
    state = run.init_state()
    b = jax.device_put(batch, state_lib.batch_sharded(mesh))
    compiled = train_step.lower(state, b, teacher).compile()  # run below: compiled once
    # The residual blocks' barriers survive fusion only with the shipped options.
    results[name + '_barriers'] = compiled.as_text().count('opt-barrier')
    initial = jax.device_get(state.params)
    state, metrics = compiled(state, b, teacher)
    results[name] = (jax.device_get(metrics), jax.device_get(state.params))
  assert results['shipped_barriers'] >= 3 + 3  # resnet8's 3 blocks in student and teacher
  assert results['xla_defaults_barriers'] == 0
  (m1, p1), (m2, p2) = results['shipped'], results['xla_defaults']
  del initial
  # A barrier changes where XLA fuses, not the arithmetic: the same numbers.
  for k in ('loss', 'loss_ce', 'hcl'):
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
