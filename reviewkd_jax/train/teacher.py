"""Loading the frozen teacher: a PyTorch state_dict or a model saved by this project."""
from __future__ import annotations

import io
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from reviewkd_jax import convert
from reviewkd_jax.train import checkpoint
from reviewkd_jax.train.state import replicated

TORCH_SUFFIXES = ('.pt', '.pth', '.pth.tar')


def variables_template(module: nn.Module, image_shape: tuple[int, int, int]) -> dict:
  """Returns the ShapeDtypeStructs of `module`'s variables (no computation)."""
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), train=False))
  return flax.core.unfreeze(shapes)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Returns host arrays `tree` as global arrays replicated over `mesh` (multi-host safe)."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def _read_torch_file(path: str) -> dict:
  """Returns the state_dict of a local or remote (gs://...) PyTorch file."""
  if '://' not in path:
    return convert.load_torch_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  obj = torch.load(io.BytesIO(epath.Path(path).read_bytes()), map_location='cpu',
                   weights_only=True)
  return convert.unwrap_state_dict(obj)


def load_teacher(path: str, module: nn.Module, *, name: str, dataset: str,
                 image_shape: tuple[int, int, int], mesh: Mesh) -> tuple[Any, str]:
  """Returns (replicated teacher variables, a description of their source).

  `path` is a `.pt`/`.pth` PyTorch state_dict (e.g. torchvision's ImageNet weights, or a
  CRD/ReviewKD CIFAR teacher), converted with `reviewkd_jax.convert`; or a run workdir, or
  its `best`/`final` folder, written by this project's trainer. A checkpoint of another
  architecture raises an error naming the mismatched keys.
  """
  template = variables_template(module, image_shape)
  if path.endswith(TORCH_SUFFIXES):
    state_dict = _read_torch_file(path)
    try:
      variables = convert.torch_to_flax(state_dict, template)
    except convert.StateDictMismatchError as e:
      raise convert.StateDictMismatchError(
          f'Teacher {name!r} cannot be loaded from {path}:\n{e}') from e
    return replicate(variables, mesh), f'PyTorch state_dict {path}'
  variables, meta = checkpoint.load_model(path, template, sharding=replicated(mesh),
                                          expect_model=name)
  if meta.get('dataset') not in (None, dataset):
    raise checkpoint.CheckpointMismatchError(
        f'The teacher at {path} was trained on {meta["dataset"]!r}, this run uses '
        f'{dataset!r}.')
  what = f'{meta.get("label", "model")} model of {path} (epoch {meta.get("epoch")}, step ' \
         f'{meta.get("step")})'
  return variables, what
