"""train/cli.py, what the commands share (one-line errors, exit statuses, --config), and the commands' old paths."""
import importlib
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

import train
from train import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = '''
import ml_collections

def get_config(arg=None):
  if arg == 'bad':
    raise ValueError('arg bad is unknown')
  c = ml_collections.ConfigDict()
  c.total_steps = 10
  c.model = dict(width=4)
  return c
'''


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / 'tiny.py'
  path.write_text(CONFIG)
  return str(path)


def _error_line(capsys, code, call, *args) -> str:
  with pytest.raises(SystemExit) as e:
    call(*args)
  err = capsys.readouterr().err
  assert e.value.code == code and err.count('\n') == 1 and err.startswith('error: '), err
  return err.strip()


def test_exit_statuses():
  assert (cli.BAD_INPUT_EXIT, cli.NON_FINITE_EXIT, cli.PREEMPTED_EXIT) == (2, 3, 75)
  assert train.PREEMPTED_EXIT == cli.PREEMPTED_EXIT


def test_fail_and_failing_on(capsys):
  assert _error_line(capsys, 2, cli.fail, 'no such thing') == 'error: no such thing'
  assert _error_line(capsys, 3, cli.fail, ValueError('loss is nan'), 3) == 'error: loss is nan'

  def raises(error):
    with cli.failing_on(FileNotFoundError, ValueError):
      raise error

  assert _error_line(capsys, 2, raises, FileNotFoundError('/x not found')) == 'error: /x not found'
  with pytest.raises(KeyError):  # Not one of the listed errors: left alone.
    raises(KeyError('k'))
  assert _error_line(capsys, 2, cli.no_arguments, ['prog', 'extra'], 'pass --x=') == (
      "error: unexpected arguments ['extra']; pass --x=")
  cli.no_arguments(['prog'])


def test_load_config_applies_overrides_and_says_what_is_wrong(config_file):
  config = cli.load_config(config_file, ['--config.model.width=8', '--config.total_steps=3'])
  assert (config.model.width, config.total_steps) == (8, 3)
  with pytest.raises(ValueError, match=f'^--config.model.depth: no such field in {config_file}; check the '
                                       'spelling against the config file'):
    cli.load_config(config_file, ['--config.model.depth=2'])
  with pytest.raises(ValueError) as e:
    cli.load_config(f'{config_file}:bad')
  assert str(e.value) == f'--config={config_file}:bad: the config file failed: ValueError: arg bad is unknown'
  with pytest.raises(ValueError) as e:
    cli.load_config('configs/no_such_config.py')
  assert str(e.value) == ("cannot load --config=configs/no_such_config.py: [Errno 2] No such file or directory: "
                          "'configs/no_such_config.py' (run from the repository root).")


def _parse(argv):
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=flag_values, sys_argv=argv)
  return cli.parse_flags(argv, holder, flag_values), holder


def test_parse_flags_ends_bad_input_with_one_line(capsys, config_file):
  rest, holder = _parse(['prog', f'--config={config_file}', '--config.total_steps=5', 'more'])
  assert rest == ['prog', 'more'] and holder.value.total_steps == 5
  assert _error_line(capsys, 2, _parse, ['prog', f'--config={config_file}', '--config.model.depth=2']) == (
      'error: --config.model.depth: no such config field; check the spelling against the config file (new fields '
      'must be added to the config, not only overridden)')
  assert _error_line(capsys, 2, _parse, ['prog']) == 'error: --config is required, e.g. --config=configs/vit_digits.py'
  assert _error_line(capsys, 2, _parse, ['prog', '--config=no_such.py']) == (
      "error: cannot load --config=no_such.py: [Errno 2] No such file or directory: 'no_such.py'")
  line = _error_line(capsys, 2, _parse, ['prog', f'--config={config_file}', '--config.total_steps=ten'])
  assert line.startswith('error: flag --config.total_steps=ten: ') and line.endswith(' (see --helpfull)')


@pytest.mark.parametrize('old, new, names', [
    ('train.sweep', 'train.study.sweep', ['plan', 'finished', 'table', 'train_all', 'report', 'Run', 'main']),
    ('train.analyze', 'train.study.analyze', ['write_report', 'load_runs', 'read_run', 'StudyError', 'main']),
    ('train.scaling', 'train.study.scaling', ['fit_power_law', 'frontier', 'analyze', 'markdown', 'plot', 'Run']),
    ('train.launch', 'train.tools.launch', ['plan', 'parse_args', 'check', 'restart_loop', 'parse_accelerator']),
    ('train.convert', 'train.tools.convert', ['import_model', 'export_model', 'load_params', 'main']),
    ('train.sample', 'train.tools.sample', ['main', 'define_flags']),
])
def test_old_module_paths_reexport_the_moved_code(old, new, names):
  old_module, new_module = importlib.import_module(old), importlib.import_module(new)
  assert [n for n in names if getattr(old_module, n) is not getattr(new_module, n)] == []


def test_moved_names_stay_at_their_old_paths():
  from train import launch, sample
  from train.tools import loader
  assert launch.load_config is cli.load_config and launch.PREEMPTED_EXIT == 75
  assert sample.load is loader.load


def test_help_of_a_moved_command_is_unchanged():
  """Its docstring and its flags, whether started at the old path or the new one."""
  outputs = [subprocess.run([sys.executable, '-m', module, '--helpshort'], cwd=REPO, capture_output=True,
                            text=True, timeout=120).stdout for module in ('train.analyze', 'train.study.analyze')]
  for out in outputs:
    assert out.startswith('Analyses a compute-budget study: python -m train.analyze'), out[:300]
    assert '--out: Directory for study.md and study.png.' in out and '--workdirs:' in out
