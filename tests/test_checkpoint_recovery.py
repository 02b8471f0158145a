"""A damaged newest checkpoint falls back to the last good one, whether its files fail to read
or read with other values (checksums); a damaged exported model is refused as a teacher;
another experiment's workdir is refused before anything is read or written (mock CIFAR-100,
tiny runs)."""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from reviewkd_jax.train import checkpoint as checkpoint_lib
from reviewkd_jax.train import SetupError, train_and_evaluate
from tests.helpers import ONE_DEVICE, snapshot, tiny_config

pytestmark = [
    pytest.mark.slow, pytest.mark.usefixtures('mock_cifar100'),
    # Reading a damaged checkpoint fails while TensorStore reads are in flight; they later
    # call back into the closed event loop ('Event loop is closed'). The trainer drops
    # those (checkpoint._drop_late_callbacks_of_failed_reads), but pytest swaps in its own
    # unraisable hook for every test and reports them as warnings.
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]


def _config(**fields):
  # A checkpoint after every step, three kept: steps 3, 4, 5 after stopping at step 5.
  return tiny_config(checkpoint_every_steps=1, keep_checkpoints=3, **fields)


def _damage(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Flips 256 bytes in the middle of every array data file of a checkpoint."""
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files, f'no data files under {step_dir}'
  for path in files:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 256] = bytes(b ^ 0xFF for b in data[mid:mid + 256])
    path.write_bytes(bytes(data))
  return files


def _flip_array_bytes(step_dir: pathlib.Path) -> None:
  """XORs 16 bytes in the middle of the largest array data file of a checkpoint: the files
  still read (orbax's compressed chunks carry no checksum), with other values."""
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  path = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
  path.write_bytes(bytes(data))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  return train_and_evaluate(_config(), str(tmp_path_factory.mktemp('reference')),
                            devices=ONE_DEVICE)


def test_damaged_newest_checkpoint_falls_back_and_continues_exactly(tmp_path, uninterrupted,
                                                                    caplog):
  stopped = train_and_evaluate(_config(stop_after_step=5), str(tmp_path), devices=ONE_DEVICE)
  assert stopped.step == 5
  ckpt_dir = tmp_path / checkpoint_lib.STATE_DIR
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [3, 4, 5]
  _damage(ckpt_dir / '5')

  resumed = train_and_evaluate(_config(), str(tmp_path), devices=ONE_DEVICE)
  # Continued from step 4: steps 5 and 6 trained again, exactly as the uninterrupted run.
  assert resumed.step == 6 and [h['step'] for h in resumed.history] == [5, 6]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(uninterrupted.state.params))
  np.testing.assert_array_equal([h['loss'] for h in resumed.history],
                                [h['loss'] for h in uninterrupted.history[4:]])
  # The damaged checkpoint was moved aside, not deleted, and the user was told.
  moved = tmp_path / checkpoint_lib.DAMAGED_DIR / '5'
  assert moved.is_dir() and any(moved.rglob('*'))
  assert any('step 5' in r.getMessage() and 'step 4' in r.getMessage()
             for r in caplog.records if r.levelname == 'WARNING')


def test_checkpoint_that_reads_with_other_values_is_caught_by_its_checksums(
    tmp_path, uninterrupted, caplog):
  train_and_evaluate(_config(stop_after_step=5), str(tmp_path), devices=ONE_DEVICE)
  ckpt_dir = tmp_path / checkpoint_lib.STATE_DIR
  _flip_array_bytes(ckpt_dir / '5')
  # The damage is in the contents only: the arrays still read, with other values.
  read = ocp.StandardCheckpointer().restore(
      ckpt_dir / '5' / 'state', checkpoint_lib.abstract_like(uninterrupted.state))
  meta = json.loads((ckpt_dir / '5' / 'meta' / 'metadata').read_text())
  assert checkpoint_lib.mismatched_arrays(read, meta)

  resumed = train_and_evaluate(_config(), str(tmp_path), devices=ONE_DEVICE)
  assert resumed.step == 6 and [h['step'] for h in resumed.history] == [5, 6]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(uninterrupted.state))
  assert (tmp_path / checkpoint_lib.DAMAGED_DIR / '5').is_dir()
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any('checkpoint of step 5' in w and 'differ from the checksums' in w and
             'resuming from step 4' in w for w in warnings), warnings


def test_damaged_exported_model_is_refused_as_a_teacher(tmp_path):
  rng = np.random.default_rng(0)
  variables = {'params': {'w': rng.normal(size=(64, 64)).astype(np.float32),
                          'b': np.zeros(64, np.float32)}}
  ckpts = checkpoint_lib.RunCheckpoints(str(tmp_path), keep=1)
  ckpts.save_model(checkpoint_lib.FINAL, 3, variables, {'model': 'resnet8'})
  ckpts.close()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded, _ = checkpoint_lib.load_model(str(tmp_path / 'final'), variables, sharding=sharding)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), variables)
  _flip_array_bytes(tmp_path / 'final' / '3')
  with pytest.raises(checkpoint_lib.DamagedModelError, match=r'final/3 is damaged: 1 array'):
    checkpoint_lib.load_model(str(tmp_path / 'final'), variables, sharding=sharding)


def test_every_checkpoint_damaged_stops_with_one_message_and_deletes_nothing(tmp_path):
  train_and_evaluate(_config(stop_after_step=5), str(tmp_path), devices=ONE_DEVICE)
  ckpt_dir = tmp_path / checkpoint_lib.STATE_DIR
  for step in (3, 4, 5):
    _damage(ckpt_dir / str(step))
  before = snapshot(tmp_path)
  with pytest.raises(SetupError) as e:
    train_and_evaluate(_config(), str(tmp_path), devices=ONE_DEVICE)
  assert isinstance(e.value.__cause__, checkpoint_lib.NoUsableCheckpointError)
  message = str(e.value)
  for step in (5, 4, 3):
    assert f'step {step}:' in message
  assert 'Nothing was moved or deleted' in message
  assert snapshot(tmp_path) == before


def test_workdir_of_another_experiment_is_refused_before_anything_is_written(tmp_path):
  train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path), devices=ONE_DEVICE)
  before = snapshot(tmp_path)
  with pytest.raises(SetupError) as e:
    train_and_evaluate(tiny_config(num_epochs=1, model='resnet14'), str(tmp_path),
                       devices=ONE_DEVICE)
  assert isinstance(e.value.__cause__, checkpoint_lib.OtherRunError)
  assert "model: 'resnet8' in the checkpoint, 'resnet14' in the config" in str(e.value)
  assert len(str(e.value).splitlines()) == 1
  assert snapshot(tmp_path) == before


def test_saving_replicated_arrays_compiles_no_slicing_programs(tmp_path):
  """On 8 devices a replicated state is written by one replica when the 1/8 slice each would
  write is small (orbax would first compile a slicing program per shape and device), and
  split over the replicas above `MIN_REPLICA_SLICE_BYTES`; both restore exactly."""
  devices = np.asarray(jax.devices()[:8])
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ('data',)),
                                          jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  big_rows = 8 * checkpoint_lib.MIN_REPLICA_SLICE_BYTES // (4 * 256)  # 1/8 of it: the limit
  state = {'small': {f'w{i}': rng.standard_normal((i + 1, 16)).astype(np.float32)
                     for i in range(5)},
           'big': rng.standard_normal((big_rows, 256)).astype(np.float32)}
  state = jax.device_put(state, replicated)
  compiled = []

  def on_event(event, duration, **kwargs):  # pylint: disable=unused-argument
    if event == '/jax/core/compile/backend_compile_duration':
      compiled.append(duration)

  ckpts = checkpoint_lib.RunCheckpoints(str(tmp_path / 'run'), keep=1)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    ckpts.save(1, {'small': state['small']}, {'step': 1})
    small_compiles = len(compiled)
    ckpts.save(2, state, {'step': 2})
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  ckpts.close()
  assert small_compiles == 0
  assert len(compiled) > 0   # the big array is still split: sliced on its 8 devices
  ckpts = checkpoint_lib.RunCheckpoints(str(tmp_path / 'run'), keep=1)
  restored, _ = ckpts.restore_newest_usable(state, lambda meta: None)
  ckpts.close()
  jax.tree.map(np.testing.assert_array_equal, restored, state)
