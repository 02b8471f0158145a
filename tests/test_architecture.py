"""The package import rules of docs/architecture.md, read from the source (nothing runs)."""
import ast
import pathlib

from tests.helpers import ROOT

PACKAGE = ROOT / 'reviewkd_jax'
# What each part of the package may import from the project (docs/architecture.md).
ALLOWED = {
    'models': set(),
    'losses': set(),
    'data': set(),
    'convert': set(),
    'platform': set(),
    'lazy_imports': set(),
    'testing': set(),
    'distill': {'models', 'losses'},
    'detection': {'models', 'losses', 'data', 'convert', 'distill'},
    'train': {'models', 'losses', 'distill', 'data', 'convert', 'detection', 'platform'},
    'bench': {'models', 'losses', 'distill', 'data', 'convert', 'train', 'testing', 'platform',
              'detection'},
    'benchmark': set(),  # the former command name: runs `bench` by name, imports nothing
    'preflight': {'models', 'losses', 'distill', 'data', 'convert', 'train', 'platform',
                  'bench', 'detection'},
}


def _part(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _project_imports(path: pathlib.Path) -> set[str]:
  """Returns the top-level parts of `reviewkd_jax` that `path` imports (at any depth)."""
  parts = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = node.module.split('.')
      if names[0] != 'reviewkd_jax':
        continue
      if len(names) > 1:
        parts.add(names[1])
      else:  # `from reviewkd_jax import losses, data`
        parts.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        names = alias.name.split('.')
        if names[0] == 'reviewkd_jax' and len(names) > 1:
          parts.add(names[1])
  return parts


BASE = {'lazy_imports'}  # any part may import these


def test_every_module_imports_only_what_its_package_may():
  files = [p for p in PACKAGE.rglob('*.py') if p.name != '__init__.py' or p.parent != PACKAGE]
  assert len(files) > 40
  bad = []
  for path in files:
    part = _part(path)
    assert part in ALLOWED, f'{path}: add its package to docs/architecture.md and ALLOWED'
    for imported in _project_imports(path) - {part} - BASE:
      if imported not in ALLOWED[part]:
        bad.append(f'{path.relative_to(ROOT)} imports reviewkd_jax.{imported}')
  assert not bad, '\n'.join(bad)


def test_the_rules_have_no_cycle():
  def reaches(start, goal, seen=()):
    return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
               for n in ALLOWED[start] if n in ALLOWED)

  assert not [p for p in ALLOWED if reaches(p, p)]


def test_distill_base_imports_no_method():
  methods = {p.stem for p in (PACKAGE / 'distill').glob('*.py')} - {'__init__', 'base'}
  source = (PACKAGE / 'distill' / 'base.py').read_text()
  for name in methods:
    assert f'distill import {name}' not in source and f'distill.{name}' not in source


def _modules_imported(path: pathlib.Path) -> set[str]:
  """Returns the full names of the `reviewkd_jax` modules `path` imports (at any depth)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.startswith('reviewkd_jax'):
        names.add(node.module)
        names.update(f'{node.module}.{alias.name}' for alias in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names if a.name.startswith('reviewkd_jax'))
  return names


def _train_modules_reached(start: str) -> set[str]:
  """Returns the `reviewkd_jax.train` modules `start` reaches through the train modules'
  imports, and every module of the project they import."""
  seen, todo = set(), [start]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    path = PACKAGE / 'train' / f'{name.rsplit(".", 1)[-1]}.py'
    if name.startswith('reviewkd_jax.train.') and path.exists():
      todo.extend(_modules_imported(path))
  return seen


def test_the_classification_run_never_reaches_detection():
  for run in ('trainer', 'setup', 'step'):
    reached = _train_modules_reached(f'reviewkd_jax.train.{run}')
    bad = sorted(n for n in reached if n.startswith('reviewkd_jax.detection')
                 or n in ('reviewkd_jax.train.detection', 'reviewkd_jax.train.tasks',
                          'reviewkd_jax.train.suite'))
    assert not bad, f'train/{run}.py reaches {bad}'


def test_the_run_core_imports_no_task():
  reached = _train_modules_reached('reviewkd_jax.train.run_core')
  assert reached <= {'reviewkd_jax.train.run_core', 'reviewkd_jax.train',
                     'reviewkd_jax.train.checkpoint', 'reviewkd_jax.lazy_imports',
                     'reviewkd_jax.lazy_imports.metric_writers'}, reached


def test_the_detection_run_does_not_import_the_classification_run():
  imported = _modules_imported(PACKAGE / 'train' / 'detection.py')
  for name in ('trainer', 'setup', 'step', 'teacher'):
    assert f'reviewkd_jax.train.{name}' not in imported


def test_detection_method_base_imports_no_method():
  folder = PACKAGE / 'detection' / 'methods'
  methods = {p.stem for p in folder.glob('*.py')} - {'__init__', 'base'}
  assert methods == {'alone', 'reviewkd', 'kd', 'fitnet', 'fgfi'}
  imported = _modules_imported(folder / 'base.py')
  assert not any(n.startswith('reviewkd_jax.detection.methods.') for n in imported), imported
