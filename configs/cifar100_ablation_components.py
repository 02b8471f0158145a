"""The paper's component ablation (Table 7) on CIFAR-100, wrn_40_2 -> wrn_16_2: the review
mechanism (RM), the residual learning framework (RLF), attention-based fusion (ABF) and the
hierarchical context loss (HCL) switched on one by one (docs/ablations.md, section 4).

  python main.py --config=configs/cifar100_ablation_components.py:row=rm_rlf \
      --workdir=runs/ablation_components_rm_rlf --config.teacher_weights=TEACHER

ROW: a name of ROWS. TEACHER: the workdir of `configs/cifar100_baseline.py:model=wrn_40_2`,
or a CRD/ReviewKD `.pt`/`.pth` state_dict of a CIFAR-100 wrn_40_2. The published numbers are
means over several runs with their variance: repeat a row with `--config.seed=1`, 2, ...

Every row is the wrn40x2_wrn16x2 pair's recipe and lambda (5.0) from configs/pairs.py with
its row's switches; row 'all' is exactly configs/cifar100_wrn40x2_wrn16x2.py.
"""
import dataclasses

import ml_collections

from configs import args
from configs import pairs

PAIR = 'wrn40x2_wrn16x2'  # the row of configs/pairs.py: networks, lambda, recipe
TEACHER_PUBLISHED = 75.61


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of Table 7: which components are on, and the published top-1 (variance)."""
  name: str
  rm: bool         # review mechanism: pairs (i, j) for every j <= i, not only (j, j)
  rlf: bool        # residual learning framework: the deepest-first fused chain
  abf: bool        # attention-based fusion in the chain (else the plain sum)
  hcl: bool        # hierarchical context loss (else plain MSE)
  published: float  # top-1 (%) of wrn_16_2, mean over runs
  variance: float   # its variance over runs

  def switches(self) -> dict:
    """Returns the row's config fields (configs/default.py's ReviewKD ablation switches)."""
    return dict(reviewkd_review=self.rm, reviewkd_residual=self.rlf,
                reviewkd_fusion=('abf' if self.abf else 'sum') if self.rlf else 'none',
                reviewkd_distance='hcl' if self.hcl else 'mse')


ROWS = (
    Row('baseline', rm=False, rlf=False, abf=False, hcl=False, published=74.3, variance=5e-2),
    Row('rm', rm=True, rlf=False, abf=False, hcl=False, published=75.2, variance=6e-2),
    Row('rm_rlf', rm=True, rlf=True, abf=False, hcl=False, published=75.6, variance=6e-2),
    Row('rm_rlf_abf', rm=True, rlf=True, abf=True, hcl=False, published=76.0, variance=6e-2),
    Row('rm_rlf_hcl', rm=True, rlf=True, abf=False, hcl=True, published=75.8, variance=5e-2),
    Row('all', rm=True, rlf=True, abf=True, hcl=True, published=76.2, variance=4e-2),
)
ARGS = {'row': tuple(row.name for row in ROWS)}


def get_row(name: str) -> Row:
  """Returns the row of ROWS named `name` (KeyError for another name)."""
  return {row.name: row for row in ROWS}[name]


def row_config(name: str) -> ml_collections.ConfigDict:
  """Returns the run of the row `name`: the pair's ReviewKD recipe with the row's switches."""
  config = pairs.reviewkd_config(PAIR)
  config.update(get_row(name).switches())
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns one row, e.g. `get_config('row=rm_rlf')`."""
  return row_config(args.parse(arg, ARGS, 'configs/cifar100_ablation_components.py')['row'])
