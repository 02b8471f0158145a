"""TensorFlow, tfds and clu's metric writers, imported where they are first used.

TensorFlow serves the input pipelines (`tf.data`) and the event files only, and importing it
takes seconds (docs/performance.md). The modules that need it refer to it through the stand-ins below, so a run that stops at a
mistake in its config, data path or workdir says so without importing it, and a library user
who never builds a pipeline never pays for it.

    from reviewkd_jax.lazy_imports import tf, tfds

Every attribute of a stand-in is looked up in the real module at each access (nothing is
copied), so patches to the real module, such as `tfds.testing.mock_data`'s, are seen.
"""
import importlib
import sys
import types

_keep_off_gpus = False
_gpus_hidden = False


class LazyModule(types.ModuleType):
  """Stands for the module `name`, which is imported at the first attribute access."""

  def __getattr__(self, attr: str):
    if attr.startswith('__') and attr.endswith('__'):
      raise AttributeError(attr)  # copy, pickle and inspect probe these: no import for them
    return getattr(load(self.__name__), attr)

  def __repr__(self) -> str:
    loaded = 'imported' if self.__name__ in sys.modules else 'not imported yet'
    return f'<lazy module {self.__name__!r} ({loaded})>'


def load(name: str) -> types.ModuleType:
  """Imports `name` (once); TensorFlow is kept off the GPUs if `keep_tensorflow_off_gpus`
  was called."""
  module = sys.modules.get(name) or importlib.import_module(name)
  if _keep_off_gpus and not _gpus_hidden and 'tensorflow' in sys.modules:
    _hide_gpus_from_tensorflow()
  return module


def keep_tensorflow_off_gpus() -> None:
  """TensorFlow, whenever it is imported, sees no GPU: it runs tf.data only and must not
  take the memory of the GPUs JAX uses. Applies at once if it is imported already."""
  global _keep_off_gpus
  _keep_off_gpus = True
  if 'tensorflow' in sys.modules:
    _hide_gpus_from_tensorflow()


def _hide_gpus_from_tensorflow() -> None:
  global _gpus_hidden
  _gpus_hidden = True
  tf_module = sys.modules['tensorflow']
  try:
    tf_module.config.experimental.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TensorFlow already initialised its devices (imported and used before this call)


tf = LazyModule('tensorflow')
tfds = LazyModule('tensorflow_datasets')
metric_writers = LazyModule('clu.metric_writers')
