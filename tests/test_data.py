"""Input pipelines: determinism, resumption, per-process shares, padded evaluation, errors.

tfds datasets are mocked (`tfds.testing.mock_data`): nothing is downloaded.
"""
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from reviewkd_jax import data
from reviewkd_jax.data import preprocess


def _config(**kw):
  config = ml_collections.ConfigDict(dict(dataset='digits', data_dir='', batch_size=64,
                                          eval_batch_size=100, seed=0, shuffle_buffer=64,
                                          train_subset=0))
  config.update(kw)
  return config


@pytest.fixture(scope='module')
def digits():
  return data.create_input_pipeline(_config())


def test_digits_batches(digits):
  assert (digits.num_train, digits.num_eval) == (1347, 450)
  assert digits.steps_per_epoch == 1347 // 64
  batch = next(digits.train_batches(0))
  assert batch['image'].shape == (64, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and batch['label'].max() < 10


def test_epoch_is_a_permutation_without_repeats(digits):
  indices = np.concatenate([b['index'] for b in digits.train_batches(3)])
  assert len(indices) == digits.steps_per_epoch * 64 == len(set(indices.tolist()))


def test_same_seed_and_epoch_same_batches_other_epoch_other_order(digits):
  a = list(digits.train_batches(1))
  b = list(digits.train_batches(1))
  c = next(digits.train_batches(2))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert (a[0]['index'] != c['index']).any()


def test_start_step_resumes_the_epoch_exactly(digits):
  full = list(digits.train_batches(5))
  tail = list(digits.train_batches(5, start_step=7))
  assert len(tail) == len(full) - 7
  for x, y in zip(full[7:], tail):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['index'], y['index'])


def test_eval_counts_every_example_once(digits):
  batches = list(digits.eval_batches())
  assert len(batches) == digits.eval_steps == 5
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 450 and (mask[:450] == 1).all() and (mask[450:] == 0).all()


def test_processes_get_disjoint_shares():
  shares = [data.create_input_pipeline(_config(), process_index=p, process_count=2)
            for p in range(2)]
  assert all(s.local_batch == 32 for s in shares)
  seen = [set(np.concatenate([b['index'] for b in s.train_batches(0)]).tolist())
          for s in shares]
  assert not seen[0] & seen[1]
  assert sum(len(list(s.eval_batches())) for s in shares) == 2 * shares[0].eval_steps
  masks = sum(int(b['mask'].sum()) for s in shares for b in s.eval_batches())
  assert masks == 450


def _tfds_even_share(n, process_index, process_count):
  """Returns tfds.even_splits' share of a split of n examples, as a (start, stop) pair."""
  infos = tfds.core.SplitDict([tfds.core.SplitInfo(name='train', shard_lengths=[n],
                                                   num_bytes=0)])
  split = tfds.even_splits('train', n=process_count)[process_index]
  (absolute,) = split.to_absolute(infos)
  return absolute.from_ or 0, n if absolute.to is None else absolute.to


@pytest.mark.parametrize('n,process_count', [(10, 3), (450, 4), (7, 2), (5, 5), (11, 4)])
def test_every_pipeline_shares_a_split_over_processes_as_tfds(n, process_count):
  """The in-memory classification datasets, the digit scenes and tfds (the streamed datasets)
  give each process the same share of the evaluation split (10 over 3 processes: 4, 3, 3)."""
  from reviewkd_jax.data.datasets import ArraySource
  from reviewkd_jax.data.shares import process_share
  images, labels = np.zeros((n, 2, 2, 1), np.uint8), np.arange(n)
  for p in range(process_count):
    expected = _tfds_even_share(n, p, process_count)
    share = process_share(n, p, process_count)
    assert (share.start, share.stop) == expected
    source = ArraySource((images, labels), (images, labels), process_index=p,
                         process_count=process_count)
    assert source._eval['index'].tolist() == list(range(*expected))
  assert [process_share(10, p, 3).stop - process_share(10, p, 3).start
          for p in range(3)] == [4, 3, 3]


@pytest.mark.parametrize('process_count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(digits, process_count):
  """The processes' local batches of step s, concatenated in process order, are the
  one-process batch of step s: same examples, same order, same augmentation."""
  shares = [data.create_input_pipeline(_config(), process_index=p,
                                       process_count=process_count)
            for p in range(process_count)]
  for epoch, start in ((0, 0), (2, 5)):  # also from the middle of an epoch (resumption)
    whole = list(digits.train_batches(epoch, start))
    local = [list(s.train_batches(epoch, start)) for s in shares]
    assert all(len(batches) == len(whole) for batches in local)
    for step, batch in enumerate(whole):
      for key in ('image', 'label', 'index'):
        np.testing.assert_array_equal(
            np.concatenate([local[p][step][key] for p in range(process_count)]), batch[key],
            err_msg=f'{key} of step {step}')


def test_batch_must_divide_over_processes():
  with pytest.raises(ValueError, match='divisible by the number of processes'):
    data.create_input_pipeline(_config(batch_size=63), process_index=0, process_count=2)


def test_pad_crop_flip_is_a_shifted_window():
  image = tf.constant(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
  out = preprocess.pad_crop_flip(image, tf.constant([1, 2], tf.int64), padding=2,
                                 flip=False).numpy()
  padded = np.pad(image.numpy(), ((2, 2), (2, 2), (0, 0)))
  windows = [padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
  assert any((out == w).all() for w in windows)


@pytest.mark.parametrize('name,size', [('cifar100', 32), ('imagenet2012', 224)])
def test_tfds_pipelines_on_mock_data(name, size):
  with tfds.testing.mock_data(num_examples=21):
    pipeline = data.create_input_pipeline(_config(dataset=name, batch_size=8,
                                                  eval_batch_size=16))
    assert (pipeline.num_train, pipeline.steps_per_epoch, pipeline.eval_steps) == (21, 2, 2)
    train = list(pipeline.train_batches(0))
    assert len(train) == 2 and train[0]['image'].shape == (8, size, size, 3)
    assert train[0]['image'].dtype == np.uint8
    evals = list(pipeline.eval_batches())
    assert sum(int(b['mask'].sum()) for b in evals) == 21
    assert evals[-1]['image'].shape == (16, size, size, 3)


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.create_input_pipeline(_config(dataset='imagenet2012', data_dir=str(tmp_path)))
  message = str(e.value)
  for text in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
               str(tmp_path / 'downloads' / 'manual'), 'tfds build imagenet2012'):
    assert text in message


def test_missing_cifar_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match='tfds build cifar100'):
    data.create_input_pipeline(_config(dataset='cifar100', data_dir=str(tmp_path)))


def test_unknown_dataset():
  with pytest.raises(ValueError, match='known datasets: cifar100, imagenet2012, digits'):
    data.create_input_pipeline(_config(dataset='cifar10'))


def test_train_subset_keeps_the_first_examples_and_the_whole_eval_split():
  pipeline = data.create_input_pipeline(_config(train_subset=100, batch_size=25))
  assert (pipeline.num_train, pipeline.num_eval, pipeline.steps_per_epoch) == (100, 450, 4)
  seen = np.concatenate([b['index'] for b in pipeline.train_batches(0)])
  assert sorted(seen.tolist()) == list(range(100))
