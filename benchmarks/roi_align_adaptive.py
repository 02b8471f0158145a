"""RoIAlign's sampling count: the fixed ratio 2 against Detectron2's adaptive count.

  python benchmarks/roi_align_adaptive.py [--rounds=5] [--json=benchmarks/roi_align_adaptive.json]

Fidelity: COCO-like boxes on an 800x1088 image (sqrt(area) log-uniform in 16..700 px, aspect
log-uniform in 1/3..3), levels by Detectron2's rule, aligned=True, 8 channels of smoothed noise
(Gaussian sigma 1 px, the harder of the smooth cases) per FPN level. The exact adaptive
reference is `roi_align_maps` (the mask-target RoIAlign, checked against torchvision's
`roi_align(sampling_ratio=0)` in tests/test_detection_roi_heads.py). Reported per setting: the
relative L2 difference per RoI (median, 90th percentile) and the share of RoIs that are exact.

Cost: the FPN pooler of one training step's box head (2 images x 512 RoIs, 256 channels, 7x7,
on 800x1088's P2-P5), forward and forward + backward, jitted, for the fixed ratio and the
adaptive count capped at 4; the settings take turns round by
round (interleaved), each round timing `--calls` calls per setting; the median per setting and
the machine's load average are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from reviewkd_jax.detection import roi_align as ra

IMAGE = (800, 1088)
SETTINGS = {'fixed 2': (2, 4), 'adaptive, cap 4': (0, 4), 'adaptive, cap 8': (0, 8)}


def coco_like_boxes(rng, n):
  size = np.exp(rng.uniform(np.log(16), np.log(700), n))
  aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
  wh = np.stack([size * np.sqrt(aspect), size / np.sqrt(aspect)], 1)
  wh = np.minimum(wh, np.asarray(IMAGE[::-1], np.float64))
  xy = rng.uniform(0, 1, (n, 2)) * (np.asarray(IMAGE[::-1]) - wh)
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def pyramid(rng, n, c, sigma=0.0):
  out = []
  for s in (4, 8, 16, 32):
    f = rng.standard_normal((n, IMAGE[0] // s, IMAGE[1] // s, c)).astype(np.float32)
    if sigma:
      f = scipy.ndimage.gaussian_filter(f, (0, sigma, sigma, 0))
      f /= f.std()
    out.append(f)
  return out


def fidelity(num_boxes=1000, channels=8, sigma=1.0, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  boxes = coco_like_boxes(rng, num_boxes)
  feats = pyramid(rng, 1, channels, sigma)
  level = np.asarray(ra.assign_levels(jnp.asarray(boxes)))
  exact = np.zeros((num_boxes, 7, 7, channels), np.float32)
  maps_fn = jax.jit(lambda m, b, i, s: ra.roi_align_maps(m, b, i, 7, spatial_scale=s,
                                                         sampling_ratio=0, aligned=True),
                    static_argnums=3)
  for lvl in range(2, 6):
    sel = np.nonzero(level == lvl)[0]
    maps = jnp.asarray(feats[lvl - 2][0].transpose(2, 0, 1))
    out = maps_fn(maps, np.repeat(boxes[sel], channels, 0),
                  np.tile(np.arange(channels), len(sel)), 2.0 ** -lvl)
    exact[sel] = np.asarray(out).reshape(len(sel), channels, 7, 7).transpose(0, 2, 3, 1)
  side = (boxes[:, 2:] - boxes[:, :2]) * 2.0 ** -level[:, None]
  need = np.ceil(side / 7).max(1)
  report = {'boxes': num_boxes, 'sigma_px': sigma,
            'share_needing_more_than': {str(k): float(np.mean(need > k)) for k in (2, 4, 8)}}
  for name, (ratio, cap) in SETTINGS.items():
    got = np.asarray(jax.jit(lambda f, b: ra.multiscale_roi_align(
        f, b, jnp.zeros(len(b), jnp.int32), 7, sampling_ratio=ratio, max_sampling_ratio=cap))(
            feats, boxes))
    rel = (np.linalg.norm((got - exact).reshape(num_boxes, -1), axis=1)
           / np.linalg.norm(exact.reshape(num_boxes, -1), axis=1))
    report[name] = {'median_rel_l2': float(np.median(rel)),
                    'p90_rel_l2': float(np.percentile(rel, 90)),
                    'share_exact': float(np.mean(rel < 1e-5))}
  return report


def cost(rounds: int, calls: int, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  feats = [jnp.asarray(f) for f in pyramid(rng, 2, 256)]
  boxes = jnp.asarray(np.concatenate([coco_like_boxes(rng, 512), coco_like_boxes(rng, 512)]))
  index = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 512)
  fns = {}
  for name, (ratio, cap) in SETTINGS.items():
    if cap > 4:   # 64 unrolled gathers of (1024, 7, 7, 4, 256): memory, not speed, limits it
      continue
    pool = lambda f, ratio=ratio, cap=cap: ra.multiscale_roi_align(
        f, boxes, index, 7, sampling_ratio=ratio, max_sampling_ratio=cap)
    fwd = jax.jit(pool)
    bwd = jax.jit(jax.grad(lambda f, pool=pool: jnp.sum(pool(f) ** 2)))
    for key, fn in ((f'{name}: forward', fwd), (f'{name}: forward + backward', bwd)):
      t = time.perf_counter()
      jax.block_until_ready(fn(feats))
      fns[key] = (fn, time.perf_counter() - t)
  times = {k: [] for k in fns}
  loads = []
  for r in range(rounds):
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for key in order:
      fn = fns[key][0]
      for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(feats))
        times[key].append(time.perf_counter() - t)
    loads.append(os.getloadavg()[0])
  return {k: {'median_ms': 1e3 * float(np.median(v)), 'first_call_s': fns[k][1]}
          for k, v in times.items()} | {'load_avg_1min_per_round': loads}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  report = {'date': time.strftime('%Y-%m-%d %H:%M'), 'cpu_count': os.cpu_count(),
            'devices': str(jax.devices()), 'load_before': os.getloadavg()[0]}
  report['fidelity'] = fidelity()
  report['cost'] = cost(args.rounds, args.calls)
  report['load_after'] = os.getloadavg()[0]
  print(json.dumps(report, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  main()
