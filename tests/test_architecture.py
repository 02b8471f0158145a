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
    'testing': set(),
    'distill': {'models', 'losses'},
    'detection': {'models', 'losses', 'data', 'convert', 'distill'},
    'train': {'models', 'losses', 'distill', 'data', 'convert', 'detection', 'platform'},
    'bench': {'models', 'losses', 'distill', 'data', 'convert', 'train', 'testing', 'platform',
              'detection'},
    'benchmark': {'models', 'losses', 'distill', 'data', 'convert', 'train', 'testing',
                  'platform', 'bench', 'detection'},
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


def test_every_module_imports_only_what_its_package_may():
  files = [p for p in PACKAGE.rglob('*.py') if p.name != '__init__.py' or p.parent != PACKAGE]
  assert len(files) > 40
  bad = []
  for path in files:
    part = _part(path)
    assert part in ALLOWED, f'{path}: add its package to docs/architecture.md and ALLOWED'
    for imported in _project_imports(path) - {part}:
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
