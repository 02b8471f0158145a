"""README's Python API example runs as written, and Quick start has the three commands."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _section(title):
  text = README.read_text()
  start = text.index(f'## {title}')
  nxt = text.find('\n## ', start + 1)
  return text[start:nxt if nxt > 0 else None]


def test_quick_start_has_install_run_test():
  block = re.search(r'```bash\n(.*?)```', _section('Quick start'), re.S).group(1)
  lines = [l for l in block.splitlines() if l.strip()]
  assert len(lines) == 3
  assert lines[0].startswith('pip install') and 'main.py' in lines[1]
  assert 'pytest' in lines[2]


def test_python_api_example_runs(capsys):
  code = re.search(r'```python\n(.*?)```', _section('Python API'), re.S).group(1)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  loss = float(scope['loss'])
  assert np.isfinite(loss) and loss > 0
  grads = scope['grads']
  assert set(grads) == {'student', 'abfs_0', 'abfs_1', 'abfs_2', 'abfs_3'}
  assert 'abfs' not in str(capsys.readouterr().err)
