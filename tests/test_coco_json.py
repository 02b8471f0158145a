"""Your own COCO-format detection data (`config.dataset = 'coco_json'`), on the digit scenes.

The test writes the scenes to disk as a COCO dataset (PNG files, instances jsons with the
categories under other ids, 3, 7, ..., 39, listed out of order; masks as polygons,
compressed RLE and uncompressed RLE in turn; annotation ids from 0; a crowd region in each
split) and reads them back through the detection pipeline: the same batches as the
in-memory scenes, step for step, and the same box and mask AP for the same detections.
Mistakes in the data stop with one message naming them, before a run writes anything.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import digit_scenes_detector
from reviewkd_jax.data import DatasetNotFoundError
from reviewkd_jax.detection import coco_json, data, evaluation, scenes
from reviewkd_jax.train import SetupError
from reviewkd_jax.train.detection import train_detector
from tests.helpers import ONE_DEVICE, ROOT, xla_flags

SCENES = scenes.SceneConfig(num_train=32, num_eval=12)
ONE_CPU = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
DISK_IDS = tuple(3 + 4 * d for d in range(scenes.NUM_CLASSES))  # digit d -> id 3 + 4d
CROWD_DIGIT = 5
SIZES = dict(batch_size=8, eval_batch_size=8)


def _polygons(mask):
  """Returns the mask as COCO polygons: one rectangle per horizontal run of pixels (exact:
  pycocotools rasterises a pixel-corner rectangle to exactly its pixels)."""
  polygons = []
  for y, row in enumerate(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
    for x0, x1 in zip(edges[::2].tolist(), edges[1::2].tolist()):
      polygons.append([x0, y, x1, y, x1, y + 1, x0, y + 1])
  return polygons


def _uncompressed_rle(mask):
  """Returns COCO's uncompressed RLE (column-major run lengths, zeros first)."""
  flat = mask.T.reshape(-1)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
  counts = np.diff(bounds).tolist()
  return {'size': list(mask.shape), 'counts': ([0] if flat[0] else []) + counts}


def _crowd_region(split):
  """Returns (scene row, x, y) of a 14x14 background square away from every digit's box, in
  the first scene of 4 digits that has one."""
  for i in np.flatnonzero(split.valid.sum(1) == 4):
    taken = np.zeros(split.images.shape[1:3], bool)
    for box in split.boxes[i][split.valid[i]].astype(int):
      taken[max(box[1] - 3, 0):box[3] + 3, max(box[0] - 3, 0):box[2] + 3] = True
    for y in range(0, taken.shape[0] - 14, 2):
      for x in range(0, taken.shape[1] - 14, 2):
        if not taken[y:y + 14, x:x + 14].any():
          return i, x, y
  raise AssertionError('no free square')


def _write_split(root, split, name):
  """Writes `split`'s scenes as PNG files and a COCO instances json; returns the json path
  and the crowd region's (image id, box x1y1x2y2)."""
  rng = np.random.default_rng(0 if name == 'train' else 1)
  (root / 'images').mkdir(exist_ok=True)
  crowd_row, x, y = _crowd_region(split)
  region = np.zeros((96, 96), np.uint8)
  region[y:y + 14, x:x + 14] = 1
  images, annotations = [], []
  for i, image_id in enumerate(split.image_ids.tolist()):
    file_name = f'{name}_{image_id:04d}.png'
    Image.fromarray(split.images[i]).save(root / 'images' / file_name)
    images.append({'id': image_id, 'file_name': file_name, 'height': 96, 'width': 96})
    if i == crowd_row:  # first: taken for an object, it would push a digit out (max_boxes)
      annotations.append({'id': len(annotations), 'image_id': image_id,
                          'category_id': DISK_IDS[CROWD_DIGIT], 'bbox': [x, y, 14, 14],
                          'area': 196, 'iscrowd': 1,
                          'segmentation': _uncompressed_rle(region)})
    for g in np.flatnonzero(split.valid[i]):
      mask = split.masks[i, g]
      x1, y1, x2, y2 = split.boxes[i, g].tolist()
      kind = len(annotations) % 3
      segmentation = (_polygons(mask) if kind == 0 else evaluation.encode_mask(mask)
                      if kind == 1 else _uncompressed_rle(mask))
      annotations.append({'id': len(annotations), 'image_id': image_id,
                          'category_id': DISK_IDS[split.labels[i, g]],
                          'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': int(mask.sum()),
                          'iscrowd': 0, 'segmentation': segmentation})
  categories = [{'id': c, 'name': str(d)} for d, c in enumerate(DISK_IDS)]
  order = rng.permutation(len(images))
  content = {'info': {'description': 'digit scenes'},
             'images': [images[k] for k in order], 'annotations': annotations,
             'categories': [categories[k] for k in rng.permutation(len(categories))]}
  path = root / f'instances_{name}.json'
  path.write_text(json.dumps(content))
  return path, (int(split.image_ids[crowd_row]), np.array([x, y, x + 14, y + 14], np.float32))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """The digit scenes written as a COCO dataset: images/, instances_{train,eval}.json."""
  root = tmp_path_factory.mktemp('coco_json')
  _, train_crowd = _write_split(root, scenes.make_scenes(SCENES, 'train'), 'train')
  _, eval_crowd = _write_split(root, scenes.make_scenes(SCENES, 'eval'), 'eval')
  return root, train_crowd, eval_crowd


def _disk_config(root, **fields):
  paths = dict(train_annotations=str(root / 'instances_train.json'),
               train_images=str(root / 'images'),
               eval_annotations=str(root / 'instances_eval.json'))
  return data.digit_scenes_config(dataset='coco_json', scenes=SCENES,
                                  **{**SIZES, **paths, **fields})


def _take(batches, n):
  return [next(batches) for _ in range(n)]


def test_batches_are_the_in_memory_scenes(folder):
  root, _, _ = folder
  memory = data.create_detection_pipeline(data.digit_scenes_config(scenes=SCENES, **SIZES))
  disk = data.create_detection_pipeline(_disk_config(root))
  assert disk.category_ids == DISK_IDS and disk.num_classes == 10
  assert (disk.num_eval, disk.source.num_train) == (12, 32)
  # Every scene has a digit, so training reads all of them, as the in-memory source does.
  assert scenes.make_scenes(SCENES, 'train').valid.any(1).all()
  # The raw masks, rasterised from polygons and both RLE kinds, are the scenes' own.
  train = scenes.make_scenes(SCENES, 'train')
  split = disk.source.train
  for row in range(6):
    crowd = split.is_crowd[split.row_splits[row]:split.row_splits[row + 1]]
    np.testing.assert_array_equal(split.masks(row)[~crowd], train.masks[row][train.valid[row]])
  # Six steps of 8 over 32 scenes: into the second epoch; the crowd region is no target.
  for a, b in zip(_take(memory.train_batches(), 6), _take(disk.train_batches(), 6)):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  evals = list(zip(memory.eval_batches(), disk.eval_batches()))
  assert len(evals) == 2 and not evals[-1][0]['valid'].all()  # 12 images: one padded batch
  for a, b in evals:
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_processes_share_the_batches_and_a_resumed_run_continues_exactly(folder):
  root, _, _ = folder
  whole = _take(data.create_detection_pipeline(_disk_config(root)).train_batches(), 5)
  halves = [_take(data.create_detection_pipeline(
      _disk_config(root), process_index=p, process_count=2).train_batches(), 5)
            for p in (0, 1)]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
        batch['image_id'], np.concatenate([h[step]['image_id'] for h in halves]))
    np.testing.assert_array_equal(
        batch['masks'], np.concatenate([h[step]['masks'] for h in halves]))
  resumed = next(data.create_detection_pipeline(_disk_config(root)).train_batches(4))
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], whole[4][key], err_msg=key)


def _detections(batch, split, crowd=None, max_det=6):
  """Fixed detections of an evaluation batch, in resized-image pixels: each digit's box
  jittered, its class (every fifth one wrong), its mask sampled in the box (28x28), a
  random score; one false positive per image; and, with `crowd` = (image id, box), a
  confident detection of the crowd region's class on it."""
  rng = np.random.default_rng(int(batch['image_id'][0]))
  b = len(batch['image_id'])
  out = {'boxes': np.zeros((b, max_det, 4), np.float32), 'scores': np.zeros((b, max_det)),
         'classes': np.zeros((b, max_det), np.int32), 'valid': np.zeros((b, max_det), bool),
         'masks': np.zeros((b, max_det, 28, 28), np.float32)}
  for i in np.flatnonzero(batch['valid']):
    row = int(np.flatnonzero(split.image_ids == batch['image_id'][i])[0])
    ratio = np.tile(batch['image_size'][i][::-1] / batch['orig_size'][i][::-1], 2)
    found = []
    for g in np.flatnonzero(split.valid[row]):
      box = np.clip(split.boxes[row, g] + rng.normal(0, 1.5, 4), 0, 96)
      label = split.labels[row, g] if len(found) % 5 != 4 else (split.labels[row, g] + 1) % 10
      centres = lambda lo, hi: np.clip(((lo + (np.arange(28) + 0.5) * (hi - lo) / 28)
                                        ).astype(int), 0, 95)
      mask = split.masks[row, g][np.ix_(centres(box[1], box[3]), centres(box[0], box[2]))]
      found.append((box, label, rng.uniform(0.3, 1.0), mask))
    x, y = rng.uniform(0, 70, 2)
    found.append((np.array([x, y, x + 20, y + 20]), rng.integers(10), rng.uniform(0, 0.6),
                  np.ones((28, 28))))
    if crowd is not None and crowd[0] == batch['image_id'][i]:
      found.append((crowd[1], CROWD_DIGIT, 0.99, np.ones((28, 28))))
    for j, (box, label, score, mask) in enumerate(found[:max_det]):
      out['boxes'][i, j], out['classes'][i, j], out['scores'][i, j] = box * ratio, label, score
      out['masks'][i, j], out['valid'][i, j] = mask, True
  return out


def _evaluate(pipeline, split, crowd=None):
  evaluator = evaluation.CocoEvaluator(pipeline.ground_truth(), pipeline.category_ids,
                                       masks=True)
  for batch in pipeline.eval_batches():
    evaluator.add(batch, _detections(batch, split, crowd))
  return evaluator.evaluate(process_index=0)


def test_the_same_detections_score_the_same_box_and_mask_ap(folder):
  root, _, eval_crowd = folder
  split = scenes.make_scenes(SCENES, 'eval')
  memory = data.create_detection_pipeline(data.digit_scenes_config(scenes=SCENES, **SIZES))
  disk = data.create_detection_pipeline(_disk_config(root))
  truth = disk.ground_truth()
  assert sorted(truth.getCatIds()) == list(DISK_IDS)
  assert sum(a['iscrowd'] for a in truth.dataset['annotations']) == 1
  # The disk's ground truth has a crowd region: a detection on it is neither a hit nor a
  # false positive there, while in memory (no crowd region) the same detection is a false
  # positive of digit 5.
  on_disk = _evaluate(disk, split, crowd=eval_crowd)
  in_memory = _evaluate(memory, split)
  assert on_disk.keys() == in_memory.keys() and 'segm/AP' in on_disk
  for key, value in in_memory.items():
    assert on_disk[key] == value or (np.isnan(value) and np.isnan(on_disk[key])), key
  assert 0.3 < in_memory['bbox/AP'] < 0.95 and 0.1 < in_memory['segm/AP'] < 0.95
  with_false_positive = _evaluate(memory, split, crowd=eval_crowd)
  assert with_false_positive['bbox/AP50'] < in_memory['bbox/AP50']


def test_ids_categories_and_optional_fields(folder, tmp_path):
  """Annotations without area or iscrowd, an image without height/width, categories with no
  annotations, an image with no object (evaluated, not trained on) are all COCO."""
  root, _, _ = folder
  shutil.copytree(root / 'images', tmp_path / 'images')
  content = json.loads((root / 'instances_eval.json').read_text())
  for ann in content['annotations']:
    if not ann['iscrowd']:
      del ann['area'], ann['iscrowd']
  del content['images'][0]['height'], content['images'][0]['width']
  empty = content['images'][1]['id']
  content['annotations'] = [a for a in content['annotations'] if a['image_id'] != empty]
  content['categories'].append({'id': 100, 'name': 'unused'})
  (tmp_path / 'eval.json').write_text(json.dumps(content))
  split = coco_json.read_split(str(tmp_path / 'eval.json'), str(tmp_path / 'images'),
                               masks=True, evaluation=True)
  assert split.category_ids == (*DISK_IDS, 100) and len(split) == 12
  assert len(split.rows_with_objects()) == 11
  truth = split.coco()
  areas = {a['id']: a['area'] for a in truth.dataset['annotations']}
  masks = [split.masks(r) for r in range(len(split))]
  assert sorted(areas.values()) == sorted(float(m.sum()) for ms in masks for m in ms)
  assert min(areas) == 1  # renumbered from 1 (the json's 0 would be "no match" in COCOeval)


def _damaged(root, tmp_path, damage):
  """Copies the dataset to tmp_path and applies `damage(copy, train json content)`; a damage
  that returns text writes that text as the training json."""
  shutil.copytree(root / 'images', tmp_path / 'images')
  shutil.copy(root / 'instances_eval.json', tmp_path / 'instances_eval.json')
  content = json.loads((root / 'instances_train.json').read_text())
  text = damage(tmp_path, content)
  (tmp_path / 'instances_train.json').write_text(
      text if isinstance(text, str) else json.dumps(content))
  return tmp_path


def _set(target, **fields):
  target.update(fields)


def _drop(target, key):
  del target[key]


DAMAGES = {
    'an image that does not decode': (
        lambda d, c: (d / 'images' / 'train_0003.png').write_bytes(b'not a picture'),
        r'1 image file\(s\) do not decode as images:\n  \S+/images/train_0003\.png: '
        r'not an image format PIL knows \(13 bytes\)'),
    'a box outside its image': (
        lambda d, c: _set(c['annotations'][4], bbox=[80, 10, 30, 12]),
        r'1 annotation box\(es\) \[x, y, width, height\] reach outside their image \(more '
        r'than 1 px\):\n  annotations\[4\] \(image_id \d+, 96x96\) bbox \[80, 10, 30, 12\]'),
    'no categories list': (
        lambda d, c: _drop(c, 'categories'),
        r"is not a COCO instances json: no 'categories' list \(it has \"info\", \"images\", "
        r'"annotations"\)'),
    'not JSON': (lambda d, c: '{"images": [', r'instances_train\.json is not valid JSON'),
    'a list, not an object': (lambda d, c: '[]', r'it holds a list, not an object'),
    'an annotation without a box': (
        lambda d, c: _drop(c['annotations'][2], 'bbox'),
        r'1 entries lack what COCO requires:\n  annotations\[2\] "bbox" is None, not \[x, y, '
        r'width, height\]'),
    'an image without file_name': (
        lambda d, c: _drop(c['images'][0], 'file_name'),
        r'images\[0\] has no "file_name"'),
    'a category missing from the list': (
        lambda d, c: _set(c['annotations'][6], category_id=99),
        r'1 annotation\(s\) have a category_id missing from the categories list \(ids \[99\]; '
        r'listed: \[3, 7, .*\]\):\n  annotations\[6\] \(image_id \d+\) category_id 99'),
    'an image file missing': (
        lambda d, c: (d / 'images' / 'train_0005.png').unlink(),
        r'1 image file\(s\) listed in the json are missing from \S+/images:\n  '
        r'\S+/images/train_0005\.png'),
    'an annotation of no image': (
        lambda d, c: _set(c['annotations'][0], image_id=5000),
        r'refer to an image_id that no entry of "images" has:\n  annotations\[0\] image_id '
        r'5000'),
    'a wrong image size': (
        lambda d, c: _set(c['images'][0], width=128),
        r'1 image\(s\) are not the size the json gives \(width x height\):\n  \S+\.png: '
        r'96x96 pixels, the json says 128x96'),
    'a polygon of text': (
        lambda d, c: _set(c['annotations'][0], segmentation=[['1', 2, 3, 4, 5, 6]]),
        r'annotations\[0\] \(image_id \d+, 96x96\) has a polygon that is not a list of '
        r'numbers'),
    'an RLE of another size': (
        lambda d, c: _set(c['annotations'][1], segmentation={'size': [64, 64],
                                                             'counts': [4096]}),
        r'has an RLE of size \[64, 64\], but the image is \[96, 96\]'),
    'duplicate image ids': (
        lambda d, c: _set(c['images'][1], id=c['images'][0]['id']),
        r'image ids \[\d+\] appear more than once in "images"'),
}


@pytest.mark.parametrize('name', sorted(DAMAGES))
def test_bad_data_is_one_message_naming_it(folder, tmp_path, name):
  damage, says = DAMAGES[name]
  root = _damaged(folder[0], tmp_path, damage)
  with pytest.raises(coco_json.CocoJsonError) as e:
    data.create_detection_pipeline(_disk_config(root))
  assert re.search(says, str(e.value)), str(e.value)
  assert str(e.value).startswith(str(root / 'instances_train.json'))


def test_masks_need_segmentations_and_eval_categories_must_be_trained(folder, tmp_path):
  root = _damaged(folder[0], tmp_path, lambda d, c: _drop(c['annotations'][3], 'segmentation'))
  with pytest.raises(coco_json.CocoJsonError, match=r'annotations\[3\] .* has no segmentation'
                     r'[\s\S]*Masks \(config.mask\) need a segmentation'):
    data.create_detection_pipeline(_disk_config(root))
  assert data.create_detection_pipeline(_disk_config(root, masks=False)).num_classes == 10
  content = json.loads((tmp_path / 'instances_eval.json').read_text())
  content['categories'].append({'id': 50, 'name': 'new'})
  content['annotations'][0]['category_id'] = 50
  (tmp_path / 'instances_eval.json').write_text(json.dumps(content))
  with pytest.raises(coco_json.CocoJsonError, match=r"instances_eval\.json: 1 annotation\(s\) "
                     r"have a category_id missing from the training json's categories list"):
    data.create_detection_pipeline(_disk_config(root, masks=False))


def test_polygons_of_fewer_than_3_points_are_dropped_as_detectron2_does(folder, tmp_path,
                                                                       caplog):
  train = scenes.make_scenes(SCENES, 'train')
  row = 2  # image id 3: its annotations follow those of images 1 and 2
  first = int(train.valid[:row].sum()) + 1  # + 1: the crowd region of image 1
  count = int(train.valid[row].sum())
  assert count == 2

  def damage(d, c):
    anns = [a for a in c['annotations'] if a['image_id'] == row + 1]
    assert [c['annotations'].index(a) for a in anns] == [first, first + 1]
    anns[0]['segmentation'] = _polygons(train.masks[row, 0]) + [[5, 5, 9, 9], [1, 2, 3]]
    anns[1]['segmentation'] = [[10, 10, 20, 10]]  # a line, nothing else

  root = _damaged(folder[0], tmp_path, damage)
  with caplog.at_level('WARNING'):
    split = coco_json.read_split(str(root / 'instances_train.json'), str(root / 'images'),
                                 masks=True)
  assert (f'2 annotation(s) have polygons of fewer than 3 points (or an odd number of '
          f'coordinates), which are dropped (annotations[{first}], annotations[{first + 1}]); '
          '1 have no other polygon and are left out (masks need one).') in caplog.text
  np.testing.assert_array_equal(split.masks(row), train.masks[row, :1])
  np.testing.assert_array_equal(split.boxes[split.row_splits[row]:split.row_splits[row + 1]],
                                train.boxes[row, :1])
  boxes_only = coco_json.read_split(str(root / 'instances_train.json'),
                                    str(root / 'images'), masks=False)
  np.testing.assert_array_equal(
      boxes_only.boxes[boxes_only.row_splits[row]:boxes_only.row_splits[row + 1]],
      train.boxes[row, :2])


def test_missing_settings_and_files(folder, tmp_path):
  root = folder[0]
  with pytest.raises(ValueError, match=r"dataset='coco_json' reads your own COCO-format data: "
                     r'set config\.eval_annotations'):
    data.create_detection_pipeline(_disk_config(root, eval_annotations=''))
  with pytest.raises(DatasetNotFoundError, match=r'annotation file \S+nothing\.json not found'):
    data.create_detection_pipeline(_disk_config(root, train_annotations=str(
        tmp_path / 'nothing.json')))
  with pytest.raises(DatasetNotFoundError, match=r'The image folder \S+ of the evaluation'):
    data.create_detection_pipeline(_disk_config(root, eval_images=str(tmp_path / 'none')))
  with pytest.raises(coco_json.CocoJsonError, match=r'instances_train\.json: 32 training '
                     r'images \(with a non-crowd annotation\) are fewer than one global batch '
                     r'\(batch_size=64\): lower config\.batch_size'):
    data.create_detection_pipeline(_disk_config(root, batch_size=64))
  only_crowd = _damaged(root, tmp_path / 'crowd', lambda d, c: _set(
      c, annotations=[a for a in c['annotations'] if a['iscrowd']]))
  with pytest.raises(coco_json.CocoJsonError, match='no image has a non-crowd annotation'):
    data.create_detection_pipeline(_disk_config(only_crowd))


def _detector_config(root, **fields):
  config = digit_scenes_detector.get_config()
  config.update(dataset='coco_json', train_annotations=str(root / 'instances_train.json'),
                train_images=str(root / 'images'),
                eval_annotations=str(root / 'instances_eval.json'), batch_size=2,
                eval_batch_size=4, max_steps=2)
  config.update(fields)
  return config


def test_bad_data_stops_a_run_before_it_writes(folder, tmp_path):
  root = _damaged(folder[0], tmp_path / 'data', lambda d, c: (
      d / 'images' / 'train_0003.png').write_bytes(b'not a picture'))
  with pytest.raises(SetupError, match=r'train_0003\.png: not an image format PIL knows'):
    train_detector(_detector_config(root), str(tmp_path / 'run'), devices=ONE_DEVICE)
  assert not (tmp_path / 'run').exists()


def _readme_command():
  text = (ROOT / 'README.md').read_text()
  start = text.index('## Your own model and data')
  section = text[start:text.find('\n## ', start + 1)]
  block = next(b for b in re.findall(r'```bash\n(.*?)```', section, re.S)
               if 'coco_json' in b)
  return shlex.split(block.replace('\\\n', ' '), comments=True)


@pytest.mark.slow  # a subprocess of main.py training a detector
def test_readme_command_trains_on_a_coco_json_folder(folder, tmp_path):
  root = folder[0]
  command = [a.replace('/data/parts/images', str(root / 'images'))
             .replace('/data/parts/train.json', str(root / 'instances_train.json'))
             .replace('/data/parts/val.json', str(root / 'instances_eval.json'))
             .replace('runs/parts', str(tmp_path / 'run'))
             for a in _readme_command() if not a.startswith('--config.weights=')]
  assert command[:2] == ['python', 'main.py'] and '--config.dataset=coco_json' in command
  toy = digit_scenes_detector.get_config()
  fields = ('train_min_sizes', 'train_max_size', 'test_min_size', 'test_max_size', 'pad_size',
            'max_boxes', 'random_flip', 'fpn_channels', 'box_head_dim', 'mask_head_dim',
            'freeze_at', 'rpn_pre_nms_topk', 'rpn_post_nms_topk', 'roi_batch_size_per_image')
  command += [f'--config.{f}={toy[f]!r}' for f in fields]
  command += ['--config.batch_size=2', '--config.eval_batch_size=4', '--config.max_steps=2',
              '--config.warmup_steps=1', '--config.lr_steps=(1,)', '--config.log_every_steps=1',
              '--config.eval_subset=4']
  proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ONE_CPU,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'on coco_json: 10 classes, 4 evaluation images' in proc.stderr, proc.stderr[-3000:]
  assert re.search(r'Done: final box AP \d+\.\d+, mask AP', proc.stderr), proc.stderr[-3000:]
  assert (tmp_path / 'run' / 'final').is_dir()
  # The same command on a folder with an image that does not decode: one message, no run.
  broken = _damaged(root, tmp_path / 'broken', lambda d, c: (
      d / 'images' / 'train_0003.png').write_bytes(b'not a picture'))
  command = [a.replace(str(root), str(broken)).replace(str(tmp_path / 'run'),
                                                       str(tmp_path / 'run2')) for a in command]
  proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ONE_CPU,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f'{broken}/images/train_0003.png: not an image format PIL knows' in proc.stderr
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'run2').exists()
