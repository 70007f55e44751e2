"""The rooms of the codebase and which may import which (reads the imports; runs nothing).

  models/   imports nothing of ours outside models/ (a model works in a notebook with only Flax).
  data/     imports nothing of ours outside data/.
  train/    the runtime: imports models/ and data/, never train.study or train.tools.
  train/study/  the compute-budget study and the pipelines: may import the runtime, not the tools (a pipeline
                runs a tool as its command, in its own process).
  train/tools/  launcher, weights, loading, sampling, generation, judging: may import the runtime, not the
                study, not each other sideways except the shared run loader (train/tools/loader.py).
  The loop, the step and the state name no model: they reach models only through train/build.py.
The command entry points kept at train/{sweep,analyze,scaling,launch,convert,sample,judge,generate,pipeline,
reference_logps}.py are shims that only re-export and run the study's or the tools' modules.
"""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
OURS = ('models', 'data', 'train', 'configs', 'benchmarks')
SHIMS = {'train/sweep.py', 'train/analyze.py', 'train/scaling.py', 'train/launch.py', 'train/convert.py',
         'train/sample.py', 'train/judge.py', 'train/generate.py', 'train/pipeline.py', 'train/reference_logps.py'}


def _modules(room: str) -> list[pathlib.Path]:
  return sorted(p for p in (ROOT / room).rglob('*.py'))


def _imports(path: pathlib.Path) -> set[str]:
  """Every module our code names in an import statement (absolute; relative ones resolved)."""
  package = '.'.join(path.relative_to(ROOT).with_suffix('').parts[:-1])
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      found.update(f'{base}.{a.name}' for a in node.names)
      found.add(base)
  return {m for m in found if m.split('.')[0] in OURS}


def _rel(path):
  return str(path.relative_to(ROOT))


@pytest.mark.parametrize('room', ['models', 'data'])
def test_models_and_data_import_only_themselves(room):
  bad = {_rel(p): sorted(m for m in _imports(p) if m.split('.')[0] != room) for p in _modules(room)}
  assert not {k: v for k, v in bad.items() if v}


def test_the_runtime_imports_neither_the_study_nor_the_tools():
  runtime = [p for p in _modules('train') if len(p.relative_to(ROOT).parts) == 2 and _rel(p) not in SHIMS]
  assert len(runtime) > 10
  bad = {_rel(p): sorted(m for m in _imports(p) if m.startswith(('train.study', 'train.tools')))
         for p in runtime}
  assert not {k: v for k, v in bad.items() if v}


def test_the_study_and_the_tools_keep_to_their_rooms():
  bad = {}
  for p in _modules('train/study'):
    bad[_rel(p)] = sorted(m for m in _imports(p) if m.startswith('train.tools'))
  for p in _modules('train/tools'):
    own = 'train.tools.' + p.stem
    bad[_rel(p)] = sorted(m for m in _imports(p) if m.startswith('train.study') or (
        m.startswith('train.tools.') and m not in (own, 'train.tools.loader')))
  assert not {k: v for k, v in bad.items() if v}


def test_shims_only_re_export():
  """A shim's body is a docstring, imports from the study, the tools or cli, and the `__main__` guard."""
  for shim in SHIMS:
    tree = ast.parse((ROOT / shim).read_text())
    for node in tree.body:
      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        continue
      if isinstance(node, ast.ImportFrom):
        assert node.module.startswith(('train.study', 'train.tools', 'train.cli')), (shim, node.module)
        continue
      assert isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'", (shim, ast.unparse(node))


@pytest.mark.parametrize('module', ['train/loop.py', 'train/steps.py', 'train/state.py'])
def test_the_loop_step_and_state_name_no_model_and_no_objective(module):
  code = '\n'.join(l for l in (ROOT / module).read_text().splitlines() if not l.strip().startswith('#'))
  assert not [m for m in _imports(ROOT / module) if m.startswith('models')]
  for name in ('vit', 'nfnet', 'mistral', 'classification', 'language_model', 'dpo', 'lora', 'freeze'):
    assert not re.search(rf'\b{name}\b', code, re.I), (module, name)
