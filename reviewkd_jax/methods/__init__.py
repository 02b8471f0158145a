"""Trainable parts of the comparison methods (FitNet, VID, CRD, OFD) as linen modules.

Their losses are pure functions in `reviewkd_jax.losses.methods`. Feature choice in the CRD
benchmark, on `feat = benchmark_features(features)` = `[stem, *stages, pooled]`:
FitNet `feat[2]`, AT and VID `feat[1:-1]`, PKT, RKD and CRD `feat[-1]`; OFD uses
`features['preact']` of both networks (mdistiller: `preact_feats[1:]`).
"""
from reviewkd_jax.methods.crd import (ClassIndex, ContrastMemory, CRDHead, Embed, MEMORY,
                                      class_index, other_class_contrast_idx,
                                      uniform_contrast_idx)
from reviewkd_jax.methods.fitnet import FitNetRegressor
from reviewkd_jax.methods.ofd import OFDConnector, ofd_margin, ofd_margins_from_params
from reviewkd_jax.methods.vid import VIDRegressor


def benchmark_features(features: dict, *, preact: bool = False) -> list:
  """Returns RepDistiller's `feat` list `[stem, *stages, pooled]` of a backbone's features.

  With `preact`, the stages are the pre-ReLU maps (RepDistiller's `preact=True`).
  """
  stages = features['preact'] if preact else features['stages']
  return [features['stem'], *stages, features['pooled']]


__all__ = [
    'CRDHead', 'ClassIndex', 'ContrastMemory', 'Embed', 'FitNetRegressor', 'MEMORY',
    'OFDConnector', 'VIDRegressor', 'benchmark_features', 'class_index', 'ofd_margin',
    'ofd_margins_from_params', 'other_class_contrast_idx', 'uniform_contrast_idx',
]
