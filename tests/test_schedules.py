"""The lr and lambda schedules at epoch boundaries, and SGD equal to PyTorch's."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from reviewkd_jax.distill import base
from reviewkd_jax.train import schedules
from reviewkd_jax.train import setup as setup_lib

SPE = 10  # steps per epoch


def _lrs(decay_epochs, steps):
  fn = schedules.classifier_lr_schedule(0.1, steps_per_epoch=SPE, decay_epochs=decay_epochs,
                                         decay_factor=0.1)
  return [float(fn(s)) for s in steps]


def test_cifar_lr_drops_after_epochs_150_180_210():
  # The authors decay after finishing 0-based epoch 150: epoch 151 is the first at 0.01.
  steps = [0, 151 * SPE - 1, 151 * SPE, 181 * SPE - 1, 181 * SPE, 211 * SPE - 1, 211 * SPE,
           240 * SPE - 1]
  np.testing.assert_allclose(_lrs((151, 181, 211), steps),
                             [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-5)


def test_imagenet_lr_drops_at_epochs_30_60_90():
  steps = [30 * SPE - 1, 30 * SPE, 60 * SPE - 1, 60 * SPE, 90 * SPE]
  np.testing.assert_allclose(_lrs((30, 60, 90), steps), [0.1, 0.01, 0.01, 1e-3, 1e-4],
                             rtol=1e-5)


def test_lr_decay_epochs_must_increase():
  with pytest.raises(ValueError, match='increasing'):
    _lrs((60, 30), [0])


@pytest.mark.parametrize('epoch,expected', [(0, 0.0), (1, 0.05), (10, 0.5), (19, 0.95),
                                            (20, 1.0), (239, 1.0)])
def test_lambda_warmup_is_min_1_epoch_over_20(epoch, expected):
  assert float(base.warmup_factor(epoch, 20)) == pytest.approx(expected)


def test_lambda_is_constant_within_an_epoch_and_traced():
  factor = jax.jit(lambda step: base.warmup_factor(schedules.epoch_of(step, SPE), 20))
  values = [float(factor(jnp.int32(s))) for s in range(5 * SPE, 6 * SPE)]
  assert values == [0.25] * SPE
  assert float(factor(jnp.int32(6 * SPE))) == pytest.approx(0.3)
  assert factor._cache_size() == 1  # one compilation for every step


def test_no_warmup_is_one():
  assert float(base.warmup_factor(0, 0)) == 1.0


@pytest.mark.parametrize('nesterov', [True, False])
def test_sgd_matches_pytorch(nesterov):
  torch = pytest.importorskip('torch')
  config = ml_collections.ConfigDict(dict(
      learning_rate=0.1, batch_size=128, base_batch_size=128, momentum=0.9, nesterov=nesterov,
      weight_decay=5e-4, lr_decay_epochs=(2,), lr_decay_factor=0.1))
  tx, _ = setup_lib.make_classifier_optimizer(config, steps_per_epoch=2)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  grads = rng.normal(size=(6, 5)).astype(np.float32)

  params = {'w': jnp.asarray(w0)}
  opt_state = tx.init(params)
  for g in grads:
    updates, opt_state = tx.update({'w': jnp.asarray(g)}, opt_state, params)
    params = jax.tree.map(jnp.add, params, updates)

  w = torch.nn.Parameter(torch.tensor(w0))
  opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4], gamma=0.1)  # step 4 = epoch 2
  for g in grads:
    w.grad = torch.tensor(g)
    opt.step()
    sched.step()
  np.testing.assert_allclose(np.asarray(params['w']), w.detach().numpy(), rtol=1e-5, atol=1e-6)
