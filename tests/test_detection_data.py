"""Detection data: COCO pipeline on mocked tfds, COCO evaluation, the digit scenes.

coco/2017 is mocked (`tfds.testing.mock_data` with our own `as_dataset`, so the fake
examples are consistent and known: tfds's random mock gives objects' fields different
lengths); tfds's own split arithmetic resolves the per-process shares. Nothing is downloaded.
"""
import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

from reviewkd_jax import data as classification_data
from reviewkd_jax.detection import data, evaluation, scenes

NUM_FAKE = 10
TINY = dict(train_min_sizes=(64, 72, 80), train_max_size=96, test_min_size=64,
            test_max_size=96, pad_size=(96, 96), max_boxes=4, batch_size=4,
            eval_batch_size=4, shuffle_buffer=8)


def _fake_image(i):
  """Returns (height, width, [(x1, y1, x2, y2, label, is_crowd)]) of fake COCO image i."""
  h, w = 40 + 3 * i, 60 - 2 * i
  objects = [(2 + j * 7 + i % 3, 3 + j * 5, 12 + j * 9 + i % 3, 15 + j * 6, (i + j) % 80,
              j == 1 and i % 2 == 0) for j in range(i % 3 + 1)]
  if i == 7:  # more than max_boxes non-crowd objects
    objects = [(1 + j, 2 + j, 20 + j, 25 + j, j, False) for j in range(6)]
  if i == 9:  # only a crowd box: training skips the image
    objects = [(5, 5, 20, 20, 3, True)]
  return h, w, objects


def _fake_examples(rows, encoded):
  for i in rows:
    h, w, objects = _fake_image(i)
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    bbox = np.array([[y1 / h, x1 / w, y2 / h, x2 / w] for x1, y1, x2, y2, *_ in objects],
                    np.float32).reshape(-1, 4)
    yield {'image': tf.io.encode_png(image).numpy() if encoded else image,
           'image/filename': f'{i}.jpg', 'image/id': np.int64(1000 + i),
           'objects': {'id': np.array([100 * i + j + 1 for j in range(len(objects))], np.int64),
                       'area': np.array([(o[2] - o[0]) * (o[3] - o[1]) for o in objects],
                                        np.int64),
                       'bbox': bbox, 'label': np.array([o[4] for o in objects], np.int64),
                       'is_crowd': np.array([o[5] for o in objects], bool)}}


def _fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False,
                     **kwargs):
  del self, read_config, shuffle_files, kwargs
  infos = {name: splits_lib.SplitInfo(name=name, shard_lengths=[NUM_FAKE], num_bytes=0)
           for name in ('train', 'validation')}
  if not isinstance(split, splits_lib.AbstractSplit):
    split = splits_lib.AbstractSplit.from_spec(split)
  rows = [r for ins in split.to_absolute(infos)
          for r in range(ins.from_ or 0, NUM_FAKE if ins.to is None else ins.to)]
  encoded = bool(decoders) and 'image' in decoders
  signature = {
      'image': tf.TensorSpec([], tf.string) if encoded else tf.TensorSpec([None, None, 3],
                                                                          tf.uint8),
      'image/filename': tf.TensorSpec([], tf.string), 'image/id': tf.TensorSpec([], tf.int64),
      'objects': {'id': tf.TensorSpec([None], tf.int64), 'area': tf.TensorSpec([None], tf.int64),
                  'bbox': tf.TensorSpec([None, 4], tf.float32),
                  'label': tf.TensorSpec([None], tf.int64),
                  'is_crowd': tf.TensorSpec([None], tf.bool)}}
  ds = tf.data.Dataset.from_generator(lambda: _fake_examples(rows, encoded),
                                      output_signature=signature)
  return ds.apply(tf.data.experimental.assert_cardinality(len(rows)))


@pytest.fixture
def mock_coco():
  with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset):
    yield


def _pipeline(process_index=0, process_count=1, **kw):
  return data.create_detection_pipeline(data.DetectionDataConfig(**{**TINY, **kw}),
                                        process_index=process_index,
                                        process_count=process_count)


# ----------------------------------------------------------------------------- resizing

def test_resized_shape_is_detectron2s():
  assert data.resized_shape(480, 640, 800, 1333) == (800, 1067, 800 / 480)
  assert data.resized_shape(640, 427, 800, 1333)[:2] == (1199, 800)
  h, w, scale = data.resized_shape(300, 1000, 800, 1333)  # longer side capped
  assert (h, w) == (400, 1333) and scale == pytest.approx(1333 / 1000)
  rng = np.random.default_rng(0)
  for _ in range(20):
    hh, ww = (int(v) for v in rng.integers(20, 700, 2))
    short, cap = int(rng.integers(32, 900)), int(rng.integers(900, 1400))
    got = [int(v) for v in data._resized_shape_tf(hh, ww, short, cap)[:2]]
    assert got == list(data.resized_shape(hh, ww, short, cap)[:2])


def test_image_resize_is_pils_bilinear_within_one_level():
  """Detectron2 resizes uint8 images with PIL's bilinear filter (antialiased when shrinking)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((70, 50), Image.BICUBIC))
  for short, cap in ((64, 96), (30, 96)):  # up- and downsampling
    config = data.DetectionDataConfig(**{**TINY, 'test_min_size': short})
    raw = {'image': image, 'image_id': np.int64(1), 'boxes': np.zeros((0, 4), np.float32),
           'labels': np.zeros(0, np.int32), 'is_crowd': np.zeros(0, bool)}
    out = data._transform(raw, tf.zeros([2], tf.int64), config, train=False)
    h, w = out['image_size'].numpy()
    assert (h, w) == data.resized_shape(50, 70, short, cap)[:2]
    pil = np.asarray(Image.fromarray(image).resize((int(w), int(h)), Image.BILINEAR))
    assert np.abs(out['image'].numpy()[:h, :w] - pil).max() <= 1


# ----------------------------------------------------------------------------- COCO pipeline

def test_coco_eval_batches_shapes_boxes_and_padding(mock_coco):
  pipeline = _pipeline(max_boxes=4)
  assert (pipeline.num_eval, pipeline.eval_steps, pipeline.num_classes) == (10, 3, 80)
  batches = list(pipeline.eval_batches())
  assert len(batches) == 3
  b = batches[0]
  assert b['image'].shape == (4, 96, 96, 3) and b['image'].dtype == np.float32
  assert b['boxes'].shape == (4, 4, 4) and b['labels'].dtype == np.int32
  assert b['image_id'].dtype == np.int64 and b['gt_valid'].dtype == bool
  assert set(b) == {'image', 'image_size', 'scale', 'orig_size', 'image_id', 'boxes',
                    'labels', 'gt_valid', 'valid'}
  valid = np.concatenate([x['valid'] for x in batches])
  assert valid.tolist() == [True] * 10 + [False] * 2
  for x in batches:
    for k in np.flatnonzero(x['valid']):
      i = int(x['image_id'][k]) - 1000
      h, w, objects = _fake_image(i)
      assert x['orig_size'][k].tolist() == [h, w]
      nh, nw, scale = data.resized_shape(h, w, 64, 96)
      assert x['image_size'][k].tolist() == [nh, nw]
      assert x['scale'][k] == pytest.approx(scale)
      assert (x['image'][k, nh:] == 0).all() and (x['image'][k, :, nw:] == 0).all()
      assert x['image'][k, :nh, :nw].max() > 0
      kept = [o for o in objects if not o[5]][:4]
      assert x['gt_valid'][k].sum() == len(kept)
      expect = np.array([o[:4] for o in kept], np.float32).reshape(-1, 4)
      expect = expect * [nw / w, nh / h, nw / w, nh / h]
      np.testing.assert_allclose(x['boxes'][k, :len(kept)], expect, atol=1e-3)
      assert x['labels'][k, :len(kept)].tolist() == [o[4] for o in kept]
      boxes = x['boxes'][k, :len(kept)]
      assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= nw).all()
      assert (boxes[:, [1, 3]] <= nh).all()


def test_coco_training_batches(mock_coco, caplog):
  data._warned.clear()
  pipeline = _pipeline()
  with caplog.at_level(logging.WARNING):
    batches = [b for _, b in zip(range(8), pipeline.train_batches())]
  assert sum('more than max_boxes=4' in r.message for r in caplog.records) == 1
  ids = np.concatenate([b['image_id'] for b in batches])
  assert 1009 not in ids  # its only box is a crowd box
  assert set(ids.tolist()) == set(range(1000, 1009))
  for b in batches:
    assert b['image'].shape == (4, 96, 96, 3) and b['valid'].all()
    sides = b['image_size'].min(axis=1)
    assert set(sides.tolist()) <= {64, 72, 80} or (b['image_size'] <= 96).all()


def test_flip_mirrors_boxes_and_pixels(mock_coco):
  flipped = [b for _, b in zip(range(4), _pipeline(random_flip=True).train_batches())]
  plain = [b for _, b in zip(range(4), _pipeline(random_flip=False).train_batches())]
  seen = set()
  for f, p in zip(flipped, plain):
    np.testing.assert_array_equal(f['image_id'], p['image_id'])
    np.testing.assert_array_equal(f['image_size'], p['image_size'])
    for k in range(len(f['image_id'])):
      h, w = p['image_size'][k]
      n = int(p['gt_valid'][k].sum())
      if np.array_equal(f['image'][k], p['image'][k]):
        seen.add('same')
        np.testing.assert_allclose(f['boxes'][k], p['boxes'][k])
        continue
      seen.add('mirrored')
      np.testing.assert_array_equal(f['image'][k, :h, :w], p['image'][k, :h, ::-1][:, -w:])
      mirrored = np.stack([w - p['boxes'][k, :n, 2], p['boxes'][k, :n, 1],
                           w - p['boxes'][k, :n, 0], p['boxes'][k, :n, 3]], -1)
      np.testing.assert_allclose(f['boxes'][k, :n], mirrored, atol=1e-4)
  assert seen == {'same', 'mirrored'}


def test_coco_processes_have_disjoint_shares_that_cover_the_set(mock_coco):
  shares = [_pipeline(p, 3, batch_size=3, eval_batch_size=3) for p in range(3)]
  evals = [list(s.eval_batches()) for s in shares]
  assert len({len(e) for e in evals}) == 1 and len(evals[0]) == shares[0].eval_steps == 4
  ids = [np.concatenate([b['image_id'][b['valid']] for b in e]).tolist() for e in evals]
  assert sorted(sum(ids, [])) == list(range(1000, 1010))  # each image exactly once
  first = [set(np.concatenate([b['image_id'] for _, b in zip(range(3), s.train_batches())])
               .tolist()) for s in shares]
  assert not (first[0] & first[1]) and not (first[0] & first[2]) and not (first[1] & first[2])


def test_coco_training_is_deterministic_and_resumable(mock_coco):
  a = [b for _, b in zip(range(5), _pipeline(seed=3).train_batches())]
  b = [x for _, x in zip(range(5), _pipeline(seed=3).train_batches())]
  c = [x for _, x in zip(range(3), _pipeline(seed=3).train_batches(start_step=2))]
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  for x, y in zip(a[2:], c):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  other = [x for _, x in zip(range(5), _pipeline(seed=4).train_batches())]
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, other))


def _write_instances(path):
  """Writes a COCO json of the fake images: rectangle polygons, annotation ids as tfds's."""
  images, annotations = [], []
  for i in range(NUM_FAKE):
    h, w, objects = _fake_image(i)
    images.append({'id': 1000 + i, 'height': h, 'width': w})
    for j, (x1, y1, x2, y2, label, crowd) in enumerate(objects):
      annotations.append({
          'id': 100 * i + j + 1, 'image_id': 1000 + i, 'iscrowd': int(crowd),
          'category_id': data.COCO_CATEGORY_IDS[label], 'area': (x2 - x1) * (y2 - y1),
          'bbox': [x1, y1, x2 - x1, y2 - y1],
          'segmentation': [[x1, y1, x2, y1, x2, y2, x1, y2]]})
  categories = [{'id': c, 'name': str(c)} for c in data.COCO_CATEGORY_IDS]
  path.write_text(json.dumps({'images': images, 'annotations': annotations,
                              'categories': categories}))


def test_coco_masks_from_the_official_json(mock_coco, tmp_path):
  _write_instances(tmp_path / 'instances_train2017.json')
  pipeline = _pipeline(masks=True, annotations_dir=str(tmp_path), random_flip=True)
  for _, b in zip(range(4), pipeline.train_batches()):
    assert b['masks'].shape == (4, 4, 96, 96) and b['masks'].dtype == np.uint8
    for k in range(4):
      h, w = b['image_size'][k]
      for g in np.flatnonzero(b['gt_valid'][k]):
        mask = b['masks'][k, g]
        assert mask[h:].sum() == 0 and mask[:, w:].sum() == 0
        ys, xs = np.nonzero(mask)
        tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(tight, b['boxes'][k, g], atol=1.6)
      assert b['masks'][k][~b['gt_valid'][k]].sum() == 0


@pytest.mark.parametrize('official_json', [True, False])
def test_coco_ground_truth_and_batches_evaluate_to_ap_1(mock_coco, tmp_path, official_json):
  """The eval batches' ground truth, used as detections, maps back onto the ground truth:
  the official json's, or (without it) the boxes tfds stores."""
  if official_json:
    _write_instances(tmp_path / 'instances_val2017.json')
  pipeline = _pipeline(annotations_dir=str(tmp_path), max_boxes=8)
  truth = pipeline.ground_truth()
  assert len(truth.getImgIds()) == NUM_FAKE
  assert len(truth.getAnnIds()) == sum(len(_fake_image(i)[2]) for i in range(NUM_FAKE))
  crowd = sum(o[5] for i in range(NUM_FAKE) for o in _fake_image(i)[2])
  assert len(truth.getAnnIds(iscrowd=True)) == crowd == 4
  evaluator = evaluation.CocoEvaluator(truth, pipeline.category_ids)
  for b in pipeline.eval_batches():
    evaluator.add(b, {'boxes': b['boxes'], 'scores': np.ones(b['labels'].shape),
                      'classes': b['labels'], 'valid': b['gt_valid']})
  metrics = evaluator.evaluate(process_index=0)
  assert metrics['bbox/AP'] == pytest.approx(1.0) and metrics['bbox/AP75'] == pytest.approx(1.0)
  if not official_json:  # tfds stores no masks
    with pytest.raises(ValueError, match='instances_val2017.json'):
      evaluation.CocoEvaluator(truth, pipeline.category_ids, masks=True)


def test_config_from_a_config_dict():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = data.DetectionDataConfig.from_config(ml_collections.ConfigDict(
      {'pad_size': [64, 96], 'batch_size': 2, 'masks': True, 'model': 'r50'}), seed=5)
  assert (config.pad_size, config.batch_size, config.masks, config.seed) == ((64, 96), 2, True, 5)
  assert config.train_min_sizes == (640, 672, 704, 736, 768, 800) and config.max_boxes == 100
  nested = data.DetectionDataConfig.from_config(
      {'dataset': 'digit_scenes', 'scenes': {'canvas_size': [64, 80], 'max_digits': 2}})
  assert nested.scenes == scenes.SceneConfig(canvas_size=(64, 80), max_digits=2)


def test_missing_annotations_say_what_to_download(mock_coco, tmp_path):
  with pytest.raises(data.DetectionDataNotFoundError) as e:
    _pipeline(masks=True, annotations_dir=str(tmp_path))
  message = str(e.value)
  assert data.ANNOTATIONS_URL in message
  assert str(tmp_path / 'instances_train2017.json') in message


def test_missing_coco_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DetectionDataNotFoundError) as e:
    _pipeline(data_dir=str(tmp_path))
  message = str(e.value)
  assert f'tfds build coco/2017 --data_dir={tmp_path}' in message
  assert str(tmp_path / 'downloads' / 'manual') in message
  assert isinstance(e.value, classification_data.DatasetNotFoundError)
  assert e.value.__cause__ is not None and 'Traceback' not in message


# ----------------------------------------------------------------------------- evaluation

def _gt(n=4, seed=0):
  """Returns (COCO, boxes (n, 3, 4), labels, valid, sizes) of separate large 100x100 boxes
  with rectangular masks; one padded row."""
  rng = np.random.default_rng(seed)
  sizes = np.array([[250 + 10 * i, 420 + 10 * i] for i in range(n)], np.int32)
  x1 = 5 + 125 * np.arange(3) + rng.integers(0, 6, (n, 3))
  y1 = rng.integers(0, 100, (n, 3))
  boxes = np.stack([x1, y1, x1 + 100, y1 + 100], -1).astype(np.float32)
  labels = rng.integers(0, 3, (n, 3)).astype(np.int32)
  valid = np.ones((n, 3), bool)
  valid[0, 2] = False
  masks = np.zeros((n, 3, sizes[:, 0].max(), sizes[:, 1].max()), np.uint8)
  for i in range(n):
    for g in range(3):
      bx = boxes[i, g].astype(int)
      masks[i, g, bx[1]:bx[3], bx[0]:bx[2]] = 1
  coco = evaluation.coco_from_arrays(np.arange(1, n + 1), sizes, boxes, labels, valid,
                                     (1, 2, 3), masks=masks)
  return coco, boxes, labels, valid, sizes


def _as_batch(boxes, labels, valid, sizes, scale=0.5, shift=0.0, pad=0):
  """Returns (batch, detections): the ground truth as detections in resized pixels."""
  n = len(boxes)
  image_size = np.round(sizes * scale).astype(np.int32)
  ratio = np.stack([image_size[:, 1] / sizes[:, 1], image_size[:, 0] / sizes[:, 0]], -1)
  det = (boxes + [shift, 0, shift, 0]) * np.tile(ratio, 2)[:, None]
  batch = {'image_id': np.arange(1, n + 1), 'image_size': image_size, 'orig_size': sizes,
           'valid': np.ones(n, bool)}
  detections = {'boxes': det.astype(np.float32), 'scores': np.ones(labels.shape, np.float32),
                'classes': labels, 'valid': valid,
                'masks': np.ones((*labels.shape, 28, 28), np.float32)}
  if pad:  # padding examples repeat image 1 with junk detections: they must not count
    batch = {k: np.concatenate([v, v[:pad]]) for k, v in batch.items()}
    batch['valid'][n:] = False
    detections = {k: np.concatenate([v, v[:pad]]) for k, v in detections.items()}
    detections['boxes'][n:] += 37
  return batch, detections


def test_perfect_detections_score_1_and_padding_is_not_counted():
  coco, boxes, labels, valid, sizes = _gt()
  evaluator = evaluation.CocoEvaluator(coco, (1, 2, 3), masks=True)
  evaluator.add(*_as_batch(boxes, labels, valid, sizes, pad=2))
  assert sorted(evaluator.image_ids) == [1, 2, 3, 4]
  metrics = evaluator.evaluate(process_index=0)
  for key in ('bbox/AP', 'bbox/AP50', 'bbox/AP75', 'bbox/APl', 'segm/AP', 'segm/AP75'):
    assert metrics[key] == pytest.approx(1.0), key
  assert np.isnan(metrics['bbox/APs'])  # no small ground truth


def test_shifted_boxes_score_a_known_lower_ap():
  coco, boxes, labels, valid, sizes = _gt()
  # A horizontal shift d of a 100-wide box: IoU = (100 - d) / (100 + d) = 0.72, so a
  # match at thresholds 0.50..0.70 (5 of 10): AP 0.5, AP50 1, AP75 0.
  d = 100 * 0.28 / 1.72
  evaluator = evaluation.CocoEvaluator(coco, (1, 2, 3))
  batch, det = _as_batch(boxes, labels, valid, sizes, shift=d)
  evaluator.add(batch, det)
  metrics = evaluator.evaluate(process_index=0)
  assert metrics['bbox/AP'] == pytest.approx(0.5, abs=1e-6)
  assert metrics['bbox/AP50'] == pytest.approx(1.0) and metrics['bbox/AP75'] == 0.0
  assert 'segm/AP' not in metrics


def test_paste_mask_is_detectron2s():
  out = evaluation.paste_mask(np.ones((28, 28), np.float32), np.array([3, 4, 13, 9.0]), 20, 16)
  expect = np.zeros((20, 16), np.uint8)
  expect[4:9, 3:13] = 1
  np.testing.assert_array_equal(out, expect)
  # Random masks and boxes against Detectron2's recipe in torch: grid_sample of the pixel
  # centres' box-relative coordinates, align_corners=False, zero padding, >= 0.5.
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  height, width, differ = 40, 50, 0
  for _ in range(20):
    mask = rng.uniform(0, 1, (28, 28)).astype(np.float32)
    x1, y1 = rng.uniform(-5, 30), rng.uniform(-5, 25)
    box = np.array([x1, y1, x1 + rng.uniform(2, 30), y1 + rng.uniform(2, 25)], np.float32)
    gx = (torch.arange(width, dtype=torch.float32) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
    gy = (torch.arange(height, dtype=torch.float32) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
    grid = torch.stack([gx[None, :].expand(height, width), gy[:, None].expand(height, width)],
                       -1)[None]
    ref = torch.nn.functional.grid_sample(torch.from_numpy(mask)[None, None], grid,
                                          align_corners=False)[0, 0].numpy() >= 0.5
    differ += int((evaluation.paste_mask(mask, box, height, width) != ref).sum())
  assert differ <= 2  # float rounding at the threshold


def _paste_one_box(mask, box, height, width, threshold=0.5):
  """The one-box paste the evaluation ran before `paste_masks` (kept here as the reference):
  Detectron2's CPU rule over the box's integer hull and one pixel beyond, in float32."""
  m_h, m_w = mask.shape
  x1, y1, x2, y2 = (float(v) for v in box)
  out = np.zeros((height, width), np.uint8)
  c0, c1 = max(math.floor(x1) - 1, 0), min(math.ceil(x2) + 1, width)
  r0, r1 = max(math.floor(y1) - 1, 0), min(math.ceil(y2) + 1, height)
  if c1 <= c0 or r1 <= r0 or x2 <= x1 or y2 <= y1:
    return out
  u = ((np.arange(c0, c1, dtype=np.float32) + 0.5 - x1) / (x2 - x1)) * m_w - 0.5
  v = ((np.arange(r0, r1, dtype=np.float32) + 0.5 - y1) / (y2 - y1)) * m_h - 0.5
  padded = np.pad(mask.astype(np.float32), 1)

  def taps(coord, size):
    low = np.floor(coord)
    frac = (coord - low).astype(np.float32)
    low = low.astype(np.int64)
    return np.clip(low + 1, 0, size + 1), np.clip(low + 2, 0, size + 1), frac

  x0i, x1i, fx = taps(u, m_w)
  y0i, y1i, fy = taps(v, m_h)
  top = padded[y0i][:, x0i] * (1 - fx) + padded[y0i][:, x1i] * fx
  bottom = padded[y1i][:, x0i] * (1 - fx) + padded[y1i][:, x1i] * fx
  values = top * (1 - fy)[:, None] + bottom * fy[:, None]
  out[r0:r1, c0:c1] = values >= threshold
  return out


@pytest.mark.parametrize('max_elements', [1, 700, 1 << 22])  # one box a group, some, all
def test_paste_masks_all_at_once_equal_the_one_box_rule_bit_for_bit(max_elements):
  rng = np.random.default_rng(1)
  differ = 0
  for trial in range(40):
    height, width, n = int(rng.integers(5, 90)), int(rng.integers(5, 90)), int(rng.integers(0, 25))
    masks = rng.uniform(0, 1, (n, 28, 28)).astype(np.float32)
    if trial % 3 == 0:  # two levels: many interpolated values land exactly on 0.5
      masks = np.where(masks > 0.5, 0.75, 0.25).astype(np.float32)
    sides = rng.choice([0.3, 2.0, 20.0, 110.0], (n, 2)) * rng.uniform(0.5, 1.5, (n, 2))
    corner = rng.uniform(-25, 90, (n, 2))
    boxes = np.concatenate([corner, corner + sides], 1)   # beyond the borders, tiny, large
    if n and trial % 4 == 0:
      boxes[0, 2] = boxes[0, 0]                           # an empty box pastes nothing
      boxes[1:, :2] = np.round(boxes[1:, :2])              # integer corners
    if trial % 2:
      boxes = boxes.astype(np.float32)                    # as the evaluation passes them
    got = evaluation.paste_masks(masks, boxes, height, width, max_elements=max_elements)
    assert got.shape == (n, height, width) and got.dtype == np.uint8
    for j in range(n):
      differ += int((got[j] != _paste_one_box(masks[j], boxes[j], height, width)).sum())
  assert differ == 0
  one = evaluation.paste_mask(masks[-1], boxes[-1], height, width)
  np.testing.assert_array_equal(one, _paste_one_box(masks[-1], boxes[-1], height, width))


def test_detections_to_coco_pastes_and_encodes_every_detection_as_one_at_a_time():
  rng = np.random.default_rng(2)
  b, d = 5, 30
  boxes = rng.uniform(-5, 90, (b, d, 4)).astype(np.float32)
  boxes[..., 2:] = boxes[..., :2] + rng.uniform(-3, 40, (b, d, 2)).astype(np.float32)
  detections = {'boxes': boxes, 'scores': rng.uniform(0, 1, (b, d)).astype(np.float32),
                'classes': rng.integers(0, 3, (b, d)).astype(np.int32),
                'valid': rng.uniform(0, 1, (b, d)) > 0.3,
                'masks': rng.uniform(0, 1, (b, d, 28, 28)).astype(np.float32)}
  batch = {'image_id': np.arange(1, b + 1), 'valid': np.array([1, 1, 0, 1, 1], bool),
           'image_size': np.array([[96, 96], [96, 96], [96, 96], [80, 100], [80, 100]]),
           'orig_size': np.array([[96, 96], [96, 96], [96, 96], [40, 50], [160, 200]])}
  ids, results = evaluation.detections_to_coco(batch, detections, (7, 8, 9))
  assert ids == [1, 2, 4, 5]
  want = []
  for i in (0, 1, 3, 4):
    h, w = batch['orig_size'][i]
    rh, rw = batch['image_size'][i]
    for j in np.flatnonzero(detections['valid'][i]):
      box = detections['boxes'][i, j] * np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
      box = np.clip(box, 0, np.array([w, h, w, h], np.float32))
      x1, y1, x2, y2 = (float(v) for v in box)
      if x2 <= x1 or y2 <= y1:
        continue
      want.append({'image_id': i + 1, 'category_id': 7 + int(detections['classes'][i, j]),
                   'bbox': [x1, y1, x2 - x1, y2 - y1],
                   'score': float(detections['scores'][i, j]),
                   'segmentation': evaluation.encode_mask(
                       _paste_one_box(detections['masks'][i, j], box, h, w))})
  assert len(want) > 40 and results == want


def test_processes_gather_to_one_evaluation_and_each_image_counts_once():
  coco, boxes, labels, valid, sizes = _gt(n=5)
  batch, det = _as_batch(boxes, labels, valid, sizes, shift=3.0)
  whole = evaluation.CocoEvaluator(coco, (1, 2, 3))
  whole.add(batch, det)
  expect = whole.evaluate(process_index=0)
  evaluators = [evaluation.CocoEvaluator(coco, (1, 2, 3)) for _ in range(2)]
  for p, rows in enumerate((slice(0, 3), slice(3, 5))):
    evaluators[p].add({k: v[rows] for k, v in batch.items()},
                      {k: v[rows] for k, v in det.items()})
  assert evaluators[1].evaluate(_fake_gather(evaluators, 1), process_index=1) is None
  got = evaluators[0].evaluate(_fake_gather(evaluators, 0), process_index=0)
  assert got == pytest.approx(expect, nan_ok=True) and 0 < got['bbox/AP'] < 1
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  assert evaluators[0].gather(multihost_utils.process_allgather) == (
      evaluators[0].image_ids, evaluators[0].results)  # the real gather, one process
  evaluators[1].image_ids.append(1)  # image 1 now counted by both processes
  with pytest.raises(ValueError, match='more than once'):
    evaluators[0].gather(_fake_gather(evaluators, 0))


def _fake_gather(evaluators, p):
  """Returns process p's all-gather of a two-process run of `evaluators` (lengths, bytes)."""
  payloads = [np.frombuffer(json.dumps({'image_ids': e.image_ids, 'results': e.results})
                            .encode(), np.uint8) for e in evaluators]
  lengths = np.array([[len(x)] for x in payloads])
  calls = []

  def allgather(x):
    calls.append(x)
    if len(calls) == 1:
      assert x.tolist() == [len(payloads[p])]
      return lengths
    np.testing.assert_array_equal(x[:len(payloads[p])], payloads[p])
    out = np.zeros((len(payloads), len(x)), np.uint8)
    for q, data_q in enumerate(payloads):
      out[q, :len(data_q)] = data_q
    return out
  return allgather


# ----------------------------------------------------------------------------- digit scenes

SMALL = scenes.SceneConfig(num_train=48, num_eval=20)


def test_scenes_are_deterministic_and_consistent():
  a = scenes.make_scenes(SMALL, 'train')
  b = scenes.make_scenes.__wrapped__(SMALL, 'train')  # recomputed, not the cached object
  for f in dataclasses.fields(a):
    np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
  other = scenes.make_scenes(dataclasses.replace(SMALL, seed=1), 'train')
  assert not np.array_equal(a.images, other.images)
  assert a.images.shape == (48, 96, 96, 3) and a.masks.shape == (48, 4, 96, 96)
  counts = a.valid.sum(1)
  assert counts.min() >= 1 and counts.max() <= 4 and len(set(counts.tolist())) > 1
  sides = []
  for i in range(len(a)):
    for g in np.flatnonzero(a.valid[i]):
      ys, xs = np.nonzero(a.masks[i, g])
      np.testing.assert_array_equal(a.boxes[i, g], [xs.min(), ys.min(), xs.max() + 1,
                                                    ys.max() + 1])  # tight around the mask
      assert a.labels[i, g] in range(10)
      sides.append(max(a.boxes[i, g, 2:] - a.boxes[i, g, :2]))
      # Ink is bright on a dark background.
      assert a.images[i][a.masks[i, g] > 0].mean() > a.images[i][a.masks[i].max(0) == 0].mean()
    assert not a.masks[i][~a.valid[i]].any()
    assert a.masks[i].sum(0).max() <= 1  # no pixel in two masks
  assert 8 < min(sides) and max(sides) <= 32


def test_scene_splits_use_disjoint_digit_images():
  train, held_out = scenes.make_scenes(SMALL, 'train'), scenes.make_scenes(SMALL, 'eval')
  rows_train = set(train.digit_index[train.valid].tolist())
  rows_eval = set(held_out.digit_index[held_out.valid].tolist())
  assert rows_train and rows_eval and not rows_train & rows_eval
  coco = held_out.coco()
  assert len(coco.getImgIds()) == 20 and len(coco.getAnnIds()) == held_out.valid.sum()


def _scene_pipeline(process_index=0, process_count=1, **kw):
  config = data.digit_scenes_config(scenes=SMALL, batch_size=8, eval_batch_size=8, **kw)
  return data.create_detection_pipeline(config, process_index=process_index,
                                        process_count=process_count)


def test_scene_batches_and_their_ground_truth_evaluate_to_ap_1():
  pipeline = _scene_pipeline()
  assert pipeline.num_classes == 10 and pipeline.category_ids == tuple(range(1, 11))
  train = next(pipeline.train_batches())
  assert train['image'].shape == (8, 128, 128, 3) and train['masks'].shape == (8, 4, 128, 128)
  assert set(train['image_size'].min(1).tolist()) <= {96, 112, 128}
  evaluator = evaluation.CocoEvaluator(pipeline.ground_truth(), pipeline.category_ids,
                                       masks=True)
  batches = list(pipeline.eval_batches())
  assert len(batches) == 3 and sum(int(b['valid'].sum()) for b in batches) == 20
  for b in batches:
    assert (b['image_size'] == 128).all() or not b['valid'].all()
    roi = np.zeros((*b['labels'].shape, 28, 28), np.float32)
    detections = {'boxes': b['boxes'], 'scores': np.ones(b['labels'].shape, np.float32),
                  'classes': b['labels'], 'valid': b['gt_valid'], 'masks': roi}
    for k in np.flatnonzero(b['valid']):  # RoI masks resampled from the ground truth
      scene = pipeline.source.eval.masks[int(b['image_id'][k]) - 1]
      for g in np.flatnonzero(b['gt_valid'][k]):
        box = b['boxes'][k, g] * 96 / 128
        crop = tf.image.crop_and_resize(
            scene[g][None, :, :, None].astype(np.float32),
            [[box[1] / 96, box[0] / 96, box[3] / 96, box[2] / 96]], [0], [28, 28])
        roi[k, g] = crop.numpy()[0, :, :, 0]
    evaluator.add(b, detections)
  metrics = evaluator.evaluate(process_index=0)
  assert metrics['bbox/AP'] == pytest.approx(1.0)
  assert metrics['segm/AP50'] == pytest.approx(1.0) and metrics['segm/AP'] > 0.85  # 0.91


def test_scene_global_batches_do_not_depend_on_the_process_count():
  whole = [b for _, b in zip(range(8), _scene_pipeline().train_batches(start_step=3))]
  halves = [[b for _, b in zip(range(8), _scene_pipeline(p, 2).train_batches(start_step=3))]
            for p in range(2)]
  for step, batch in enumerate(whole):
    for key in ('image', 'boxes', 'image_id'):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
  full = [b for _, b in zip(range(6), _scene_pipeline().train_batches())]
  epoch = np.concatenate([b['image_id'] for b in full]).tolist()
  assert sorted(epoch) == list(range(1, 49))  # an epoch is a permutation of the scenes
  np.testing.assert_array_equal(full[3]['image'], whole[0]['image'])  # resumed at step 3
