"""Input pipelines: tfds datasets (CIFAR-100, ImageNet) and scikit-learn's digits, per process.

`create_input_pipeline(config)` returns an `InputPipeline` whose batches are numpy dicts of
uint8 `image`, int32 `label` and `index` (training) or `mask` (evaluation).
"""
from reviewkd_jax.data.datasets import (DATASETS, DatasetNotFoundError, DatasetSpec, get_spec,
                                        load_source)
from reviewkd_jax.data.pipeline import InputPipeline, to_global_arrays


def create_input_pipeline(config, *, process_index: int = 0, process_count: int = 1
                          ) -> InputPipeline:
  """Returns the pipeline of `config.dataset`; raises DatasetNotFoundError if not prepared."""
  spec = get_spec(config.dataset)
  source = load_source(spec, data_dir=config.data_dir or None, process_index=process_index,
                       process_count=process_count, shuffle_buffer=config.shuffle_buffer,
                       train_subset=config.train_subset)
  return InputPipeline(spec, source, batch_size=config.batch_size,
                       eval_batch_size=config.eval_batch_size, seed=config.seed,
                       process_index=process_index, process_count=process_count)


__all__ = ['DATASETS', 'DatasetNotFoundError', 'DatasetSpec', 'InputPipeline',
           'create_input_pipeline', 'get_spec', 'load_source', 'to_global_arrays']
