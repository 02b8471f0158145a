"""Per-example augmentation in TensorFlow, stateless: the same seed gives the same pixels.

Every function returns uint8 images (normalisation happens on the device), so what crosses
to the accelerator is a quarter of the float32 bytes. Seeds are shape-(2,) int tensors.
"""
from __future__ import annotations


from reviewkd_jax.data.datasets import DatasetSpec
from reviewkd_jax.lazy_imports import tf


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def pad_crop_flip(image: tf.Tensor, seed: tf.Tensor, *, padding: int, flip: bool) -> tf.Tensor:
  """Returns a random crop of the zero-padded image at its own size, flipped half the time."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if padding:
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return image


def random_resized_crop_flip(encoded: tf.Tensor, seed: tf.Tensor, *, size: int) -> tf.Tensor:
  """Returns RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + flip of a JPEG.

  Only the sampled window of the JPEG is decoded. The window sampler is TF's (10 attempts,
  the whole image if none fits), torchvision falls back to a centre crop instead.
  """
  box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.image.extract_jpeg_shape(encoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=box_seed,
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _to_uint8(image)


def resize_center_crop(encoded: tf.Tensor, *, size: int, resize: int) -> tf.Tensor:
  """Returns Resize(resize) + CenterCrop(size) of a JPEG, decoding only the kept window."""
  shape = tf.image.extract_jpeg_shape(encoded)
  h, w = shape[0], shape[1]
  side = tf.cast(tf.round(tf.cast(tf.minimum(h, w), tf.float32) * size / resize), tf.int32)
  window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  return _to_uint8(image)


def train_fn(spec: DatasetSpec):
  """Returns `f(image, seed) -> uint8 image` for training examples of `spec`."""
  if spec.kind == 'crop':
    return lambda image, seed: pad_crop_flip(image, seed, padding=spec.crop_padding,
                                             flip=spec.random_flip)
  return lambda encoded, seed: random_resized_crop_flip(encoded, seed, size=spec.image_size)


def eval_fn(spec: DatasetSpec):
  """Returns `f(image) -> uint8 image` for evaluation examples of `spec`."""
  if spec.kind == 'crop':
    return lambda image: image
  return lambda encoded: resize_center_crop(encoded, size=spec.image_size,
                                            resize=spec.eval_resize)
