"""scikit-learn's 8x8 handwritten digits as a 32x32 RGB dataset: real data with no download.

1797 images of 10 classes ship inside scikit-learn. A fixed stratified split keeps a quarter
for testing; images are upsampled bilinearly to 32x32 and repeated over three channels, so
every CIFAR network runs on them unchanged.
"""
from __future__ import annotations

import functools

import numpy as np

TEST_FRACTION = 0.25
SPLIT_SEED = 0


@functools.cache
def load_digits_32() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Returns ((train images, labels), (test images, labels)); images uint8 (N, 32, 32, 3)."""
  from reviewkd_jax.lazy_imports import tf  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  data = load_digits()
  images = data.images.astype(np.float32)[..., None] / 16.0
  images = tf.image.resize(images, (32, 32), method='bilinear').numpy()
  images = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
  images = np.repeat(images, 3, axis=-1)
  labels = data.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
  return (x_train, y_train), (x_test, y_test)
