"""The one argument style of the parameterised configs: `FILE.py:key=value[,key=value]`.

  python main.py --config=configs/cifar100_baseline.py:model=resnet56 ...
  python main.py --config=configs/cifar100_table1.py:pair=r56_r20,method=crd ...

ml_collections passes everything after the first ':' to the file's `get_config`; `parse`
checks it against the allowed keys and values. A bad or missing argument raises ValueError
saying what is wrong, the exact form and every allowed value (main.py prints it without a
traceback).
"""
from collections.abc import Mapping, Sequence


def usage(config_file: str, allowed: Mapping[str, Sequence[str]]) -> str:
  """Returns 'Write --config=FILE:k=K,... with K one of a, b and ...', the form to type."""
  form = ','.join(f'{key}={key.upper()}' for key in allowed)
  choices = ' and '.join(f'{key.upper()} one of {", ".join(values)}'
                         for key, values in allowed.items())
  return f'Write --config={config_file}:{form} with {choices}.'


def parse(arg: str | None, allowed: Mapping[str, Sequence[str]],
          config_file: str) -> dict[str, str]:
  """Returns {key: value} of `arg`, 'key=value[,key=value]', with every key of `allowed`.

  Args:
    arg: the text after the config file's ':' (None when there is none).
    allowed: key -> the values it takes, in the order the message lists them.
    config_file: the file as the user types it, e.g. 'configs/cifar100_table1.py'.

  Raises:
    ValueError: `arg` is missing, not key=value, names an unknown key or a key twice, lacks
      a key, or gives a value not allowed; the message names the problem, the form and
      every allowed value.
  """

  def fail(problem: str):
    raise ValueError(f'{config_file}: {problem}. {usage(config_file, allowed)}')

  if not arg or not arg.strip():
    fail('needs an argument after the file name')
  fields = {}
  for item in arg.split(','):
    key, sep, value = (s.strip() for s in item.partition('='))
    if not sep:
      hint = ''
      if len(allowed) == 1:  # the old `FILE.py:VALUE` style
        only = next(iter(allowed))
        hint = f' (did you mean {only}={key}?)' if key in allowed[only] else ''
      fail(f'{item.strip()!r} in {arg!r} is not key=value{hint}')
    if key not in allowed:
      fail(f'unknown key {key!r} in {arg!r}')
    if key in fields:
      fail(f'{key} given twice in {arg!r}')
    fields[key] = value
  missing = [key for key in allowed if key not in fields]
  if missing:
    fail(f'{" and ".join(missing)} missing in {arg!r}')
  for key, value in fields.items():
    if value not in allowed[key]:
      fail(f'unknown {key} {value!r} in {arg!r}')
  return fields
