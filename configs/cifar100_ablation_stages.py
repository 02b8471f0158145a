"""The paper's stage-pair ablation on CIFAR-100: one resnet20 stage distilled from one resnet56
stage, for every student stage i and teacher stage j in 1..4 (docs/ablations.md, section 3).

  python main.py --config=configs/cifar100_ablation_stages.py:student_stage=3,teacher_stage=4 \
      --workdir=runs/ablation_stages_s3_t4 --config.teacher_weights=TEACHER

STUDENT_STAGE, TEACHER_STAGE: 1..4, the review levels of the CIFAR ResNets shallow to deep:
stages 1-3 are the three residual stages (32, 16, 8 px; 16, 32, 64 channels for resnet20 and
resnet56), stage 4 the pooled embedding (1x1, 64 channels). TEACHER: the workdir of
`configs/cifar100_baseline.py:model=resnet56`, or a CRD/ReviewKD `.pt`/`.pth` state_dict of a
CIFAR-100 resnet56.

Each cell is single-layer distillation without review or residual chain,
loss = CE + lambda * min(1, epoch / 20) * MSE(resize(BN(conv1x1(F_s^i))), F_t^j), with the
r56_r20 pair's recipe and lambda (0.6) from configs/pairs.py: the slides give neither the
lambda nor the distance of this table. `--config.reviewkd_distance=hcl` swaps the MSE for HCL.
PUBLISHED holds the slides' top-1 of every cell; the student trained alone: 69.1.
"""
import ml_collections

from configs import args
from configs import pairs

PAIR = 'r56_r20'  # the row of configs/pairs.py: networks, lambda, recipe
STAGES = ('1', '2', '3', '4')
ARGS = {'student_stage': STAGES, 'teacher_stage': STAGES}
STUDENT_BASELINE = 69.1  # resnet20 alone, as the slides give it (Table 1: 69.06)
# (student stage, teacher stage) -> the slides' top-1 (%) of resnet20 distilled from resnet56.
PUBLISHED = {
    (1, 1): 69.5, (1, 2): 69.0, (1, 3): 68.2, (1, 4): 66.3,
    (2, 1): 69.6, (2, 2): 69.6, (2, 3): 61.4, (2, 4): 61.1,
    (3, 1): 69.2, (3, 2): 69.8, (3, 3): 71.0, (3, 4): 50.4,
    (4, 1): 69.2, (4, 2): 69.3, (4, 3): 70.3, (4, 4): 70.3,
}


def stage_pair_config(student_stage: int, teacher_stage: int) -> ml_collections.ConfigDict:
  """Returns the run of one cell: resnet20 stage `student_stage` from resnet56 `teacher_stage`."""
  config = pairs.reviewkd_config(PAIR)
  config.reviewkd_review = False
  config.reviewkd_residual = False
  config.reviewkd_fusion = 'none'
  config.reviewkd_distance = 'mse'
  config.reviewkd_student_stage = student_stage
  config.reviewkd_teacher_stage = teacher_stage
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns one cell, e.g. `get_config('student_stage=3,teacher_stage=4')`."""
  fields = args.parse(arg, ARGS, 'configs/cifar100_ablation_stages.py')
  return stage_pair_config(int(fields['student_stage']), int(fields['teacher_stage']))
