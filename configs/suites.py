"""What the demo suites share: the teacher, then per seed the student alone and with ReviewKD,
compared by the mean over seeds of each group's final figure (`train/suite.py`)."""
import ml_collections


def reviewkd_vs_alone(runs: dict, seeds, *, teacher_note: str) -> ml_collections.ConfigDict:
  """Returns the suite config of `runs` ('teacher', 'student_{seed}', 'reviewkd_{seed}')."""
  config = ml_collections.ConfigDict()
  config.task = 'suite'
  config.runs = ml_collections.ConfigDict(runs)
  config.run_order = tuple(runs)
  config.groups = ml_collections.ConfigDict({
      'student alone': tuple(f'student_{s}' for s in seeds),
      'student + ReviewKD': tuple(f'reviewkd_{s}' for s in seeds)})
  config.compare = ('student + ReviewKD', 'student alone')
  config.teacher_note = teacher_note
  return config
