"""The paper's Table 1 on CIFAR-100: each teacher -> student pair with each method.

  python main.py --config=configs/cifar100_table1.py:pair=r56_r20,method=crd \
      --workdir=runs/r56_r20_crd --config.teacher_weights=TEACHER

PAIR: a 'Table 1' row of configs/pairs.py. METHOD: one column of the table, any registered
method but 'none' (`reviewkd_jax.train.list_methods()`). A wrong argument lists both.
TEACHER: the workdir of `configs/cifar100_baseline.py:model=<teacher>`, or a CRD/ReviewKD
`.pt`/`.pth` state_dict of the CIFAR-100 teacher. Every field can still be overridden
(`--config.crd_weight=1.0`, `--config.kd_weight=0.9` to add the logit KD term).

reviewkd is the authors' recipe (the same config as `configs/cifar100_<pair>.py`). The other
columns use the recipe that produced them: RepDistiller's train_student.py (the CRD
benchmark, whose KD/FitNet/AT/PKT/RKD/CRD/VID numbers the paper copies; mdistiller runs OFD
and DKD with the same one): batch 64, lr 0.05, SGD momentum 0.9 without Nesterov, weight
decay 5e-4, 240 epochs, lr x0.1 from 1-based epochs 151, 181, 211 (0-based 150, 180, 210),
teacher in eval mode; loss weights as RepDistiller's scripts pass them (`kd`: -r 0.1 -a 0.9;
the others -r 1 -a 0 -b <method weight>). OFD's teacher uses batch statistics, as OFD's and
mdistiller's code leave it in train mode; DKD's beta is mdistiller's per-pair value (the
row's dkd_beta). RepDistiller reports the last epoch's accuracy: compare `final` with the
row's `published` (`pairs.get(PAIR).published[METHOD]`).
"""
import ml_collections

from configs import args
from configs import default
from configs import pairs
from reviewkd_jax.train import list_methods

PAIRS = pairs.names(table='Table 1')
METHODS = tuple(m for m in list_methods() if m != 'none')
ARGS = {'pair': PAIRS, 'method': METHODS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe of one Table 1 entry, e.g. `get_config('pair=r56_r20,method=crd')`."""
  fields = args.parse(arg, ARGS, 'configs/cifar100_table1.py')
  pair, method = pairs.get(fields['pair']), fields['method']
  if method == 'reviewkd':
    return pairs.reviewkd_config(pair.name)
  config = default.get_config()
  config.model = pair.student
  config.teacher = pair.teacher
  config.method = method
  # RepDistiller's train_student.py.
  config.batch_size = 64
  config.learning_rate = 0.05
  config.base_batch_size = 64
  config.nesterov = False
  config.lr_decay_epochs = (150, 180, 210)
  config.teacher_bn_mode = 'batch_stats' if method == 'ofd' else 'eval'
  if method == 'kd':
    config.ce_weight, config.kd_weight = 0.1, 0.9
  if method == 'dkd':
    config.dkd_beta = pair.dkd_beta
  return config
