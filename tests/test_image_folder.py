"""A folder of images as a classification dataset (data.image_folder), on PNG and JPEG files
written here: classes and labels, computed mean/std, both augmentation recipes, batches that
do not depend on the process count, exact resumption, and one message per bad folder."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import default
from reviewkd_jax import data
from reviewkd_jax.data import datasets
from reviewkd_jax.data import image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('cat', 'dog', 'fish')
# (file name, (height, width)) per class and split; 16 px squares stay as they are.
TRAIN = (('a.png', (16, 16)), ('b.jpg', (24, 20)), ('c.png', (20, 28)), ('d.jpeg', (16, 16)))
VAL = (('e.png', (16, 16)), ('f.jpg', (18, 30)))


def _write(root, split, files, seed):
  rng = np.random.default_rng(seed)
  for label, name in enumerate(CLASSES):
    folder = root / split / name
    folder.mkdir(parents=True)
    for file, (h, w) in files:
      pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
      pixels[..., label] = 200  # one channel per class
      Image.fromarray(pixels).save(folder / file)


@pytest.fixture(name='folder')
def fixture_folder(tmp_path):
  root = tmp_path / 'images'
  _write(root, 'train', TRAIN, 0)
  _write(root, 'val', VAL, 1)
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image, ignored')
  return root


def _config(root, **fields):
  config = default.get_config()
  config.update(dataset=str(root), batch_size=4, eval_batch_size=4, folder_image_size=16)
  config.update(fields)
  return config


def _pixels(path):
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def test_classes_labels_and_computed_stats(folder):
  spec = image_folder.register_from_config(_config(folder))
  assert data.get_spec(str(folder)) is spec
  assert (spec.num_classes, spec.num_train, spec.image_shape) == (3, 12, (16, 16, 3))
  assert (spec.kind, spec.crop_padding, spec.eval_split) == ('crop', 2, 'val')
  pixels = np.concatenate([_pixels(folder / 'train' / c / f).reshape(-1, 3) / 255.0
                           for c in CLASSES for f, _ in TRAIN])
  np.testing.assert_allclose(spec.mean, pixels.mean(0), rtol=1e-9)
  np.testing.assert_allclose(spec.std, pixels.std(0), rtol=1e-9)
  given = image_folder.register_image_folder(str(folder), mean=(0.5,) * 3, std=(0.25,) * 3,
                                             name='given_stats')
  assert (given.mean, given.std) == ((0.5,) * 3, (0.25,) * 3)


def test_batches_labels_and_evaluation(folder):
  config = _config(folder)
  image_folder.register_from_config(config)
  pipeline = data.create_input_pipeline(config)
  labels = pipeline.source.train_labels
  assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
  assert (pipeline.num_train, pipeline.num_eval, pipeline.steps_per_epoch) == (12, 6, 3)
  seen = []
  for batch in pipeline.train_batches(0):
    assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
    np.testing.assert_array_equal(batch['label'], labels[batch['index']])
    seen += batch['index'].tolist()
  assert sorted(seen) == list(range(12))
  eval_batches = list(pipeline.eval_batches())
  images = np.concatenate([b['image'] for b in eval_batches])
  mask = np.concatenate([b['mask'] for b in eval_batches])
  assert mask.sum() == 6 and len(images) == 8
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in eval_batches])[:6],
                                [0, 0, 1, 1, 2, 2])
  # A 16 px PNG is the file's pixels; an 18x30 JPEG is resized to 16 and centre-cropped.
  np.testing.assert_array_equal(images[2], _pixels(folder / 'val' / 'dog' / 'e.png'))
  assert (images[3][..., 1] > 150).mean() > 0.9  # 'dog' is the green one


def test_batches_do_not_depend_on_processes_and_resume_exactly(folder):
  spec = image_folder.register_from_config(_config(folder))

  def pipeline(index, count):
    source = datasets.load_source(spec, data_dir=None, process_index=index,
                                  process_count=count)
    return data.InputPipeline(spec, source, batch_size=4, eval_batch_size=4, seed=3,
                              process_index=index, process_count=count)

  whole = list(pipeline(0, 1).train_batches(1))
  halves = [list(pipeline(p, 2).train_batches(1)) for p in range(2)]
  for step, batch in enumerate(whole):
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))
  resumed = list(pipeline(0, 1).train_batches(1, start_step=1))
  for a, b in zip(whole[1:], resumed, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  evals = [np.concatenate([b['image'][b['mask'] == 1] for b in pipeline(p, 2).eval_batches()])
           for p in range(2)]
  assert len(evals[0]) + len(evals[1]) == 6


def test_imagenet_recipe_on_png_and_jpeg(folder):
  config = _config(folder, folder_augmentation='imagenet', folder_flip=False)
  spec = image_folder.register_from_config(config)
  assert (spec.kind, spec.eval_resize, spec.random_flip) == ('inception', 18, False)
  pipeline = data.create_input_pipeline(config)
  batch = next(pipeline.train_batches(0))
  assert batch['image'].shape == (4, 16, 16, 3)
  first, second = (np.concatenate([b['image'] for b in pipeline.eval_batches()])
                   for _ in range(2))
  np.testing.assert_array_equal(first, second)
  assert first.shape == (8, 16, 16, 3)
  assert (first[0][..., 0] > 150).mean() > 0.8  # a re-encoded PNG of 'cat', the red one


@pytest.mark.parametrize('damage, expected', [
    (lambda r: (r / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg'),
     ['1 file(s) do not decode as images', 'train/dog/broken.jpg']),
    (lambda r: (r / 'train' / 'emu').mkdir(),
     ['1 class folder(s) hold no images', 'train/emu']),
    (lambda r: (r / 'val' / 'emu').mkdir(),
     ['val has class folders the training split does not: emu']),
    (lambda r: os.rename(r / 'val', r / 'validation'),
     ['no val/ folder (it holds: train, validation)']),
])
def test_bad_folders_say_what_is_wrong(folder, damage, expected):
  damage(folder)
  with pytest.raises(image_folder.ImageFolderError) as e:
    image_folder.register_from_config(_config(folder))
  for text in expected:
    assert text in str(e.value)


def test_bad_settings(folder, tmp_path):
  with pytest.raises(image_folder.ImageFolderError, match='No image folder at'):
    image_folder.register_from_config(_config(tmp_path / 'nothing'))
  with pytest.raises(image_folder.ImageFolderError, match='Give both mean and std'):
    image_folder.register_from_config(_config(folder, folder_mean=(0.5, 0.5, 0.5)))
  with pytest.raises(image_folder.ImageFolderError, match="one of \\('cifar', 'imagenet'\\)"):
    image_folder.register_from_config(_config(folder, folder_augmentation='autoaugment'))
  assert image_folder.register_from_config(_config(folder, dataset='digits')) is None
  assert image_folder.register_from_config(ml_collections.ConfigDict({'dataset': 'x/y'})) is None


@pytest.mark.slow  # a subprocess of main.py
def test_main_trains_on_an_image_folder(folder, tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py', f'--config.dataset={folder}',
       '--config.model=resnet8', '--config.folder_image_size=16', '--config.batch_size=8',
       '--config.eval_batch_size=8', '--config.num_epochs=1', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '12 train / 6 eval examples, 1 steps per epoch of 8' in proc.stderr
  assert 'Done: final top-1' in proc.stderr
  broken = folder / 'train' / 'cat' / 'broken.png'
  broken.write_bytes(b'nothing')
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py', f'--config.dataset={folder}',
       f'--workdir={tmp_path / "run2"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1 and str(broken) in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'run2').exists()
