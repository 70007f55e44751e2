"""train/cli.py, what the commands share (one-line errors, exit statuses, --config), and the commands' old paths."""
import importlib
import os
import resource
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
  assert (cli.BAD_INPUT_EXIT, cli.NON_FINITE_EXIT, cli.TRANSIENT_IO_EXIT, cli.PREEMPTED_EXIT) == (2, 3, 74, 75)
  assert train.PREEMPTED_EXIT == cli.PREEMPTED_EXIT


def _wrapped(cause):
  try:
    raise cause
  except OSError as e:
    try:
      raise RuntimeError('the save failed') from e
    except RuntimeError as wrapper:
      return wrapper


@pytest.mark.parametrize('error, code, line', [
    (ValueError('workdir busy:\n held by host1'), 2, 'error: workdir busy: held by host1 (--traceback for details)'),
    (FileNotFoundError('no dataset'), 2, 'error: no dataset (--traceback for details)'),
    (PermissionError(13, 'Permission denied', '/w/config.json'), 2,
     "error: [Errno 13] Permission denied: '/w/config.json' (--traceback for details)"),
    (FloatingPointError('train/loss is nan at step 3'), 3, 'error: train/loss is nan at step 3'),
    (OSError(28, 'No space left on device', '/w/checkpoints'), 74,
     "error: [Errno 28] No space left on device: '/w/checkpoints': an I/O failure (a full disk, an unreachable "
     'filesystem); once the storage is back, rerun the same command to resume from the last checkpoint'),
    (_wrapped(OSError(5, 'Input/output error')), 74, 'error: [Errno 5] Input/output error: an I/O failure'),
    (_wrapped(FileNotFoundError(2, 'No such file or directory', '/w/x')), 2, 'error: the save failed'),
    (ValueError("OUT_OF_RANGE: Error writing local file \"/w/d/x\": File too large [os_error_code='27']"), 74,
     'error: OUT_OF_RANGE: Error writing local file "/w/d/x": File too large [os_error_code=\'27\']: an I/O failure'),
    (ValueError("NOT_FOUND: Error opening \"/w/d/x\" [os_error_code='2']"), 2, 'error: NOT_FOUND: Error opening'),
    (OSError(30, 'Read-only file system', '/w'), 2, "error: [Errno 30] Read-only file system: '/w' (--traceback"),
    (KeyError('layer_3'), 1, "error: unexpected KeyError: 'layer_3' (--traceback shows where)"),
    (RuntimeError('x' * 5000), 1, 'error: unexpected RuntimeError: xxx'),
])
def test_every_failure_ends_with_its_status_and_one_line(capsys, error, code, line):
  def raises():
    with cli.ending_failures():
      raise error

  got = _error_line(capsys, code, raises)
  assert got.startswith(line) and len(got) <= 2007, got


def test_a_full_disk_during_a_save_exits_74_in_one_line(digits_dir, tmp_path):
  """A file size limit (RLIMIT_FSIZE) makes the checkpoint's writes fail as a full disk would: orbax's
  tensorstore reports it as a ValueError carrying the errno, and orbax and asyncio log it with tracebacks."""
  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))  # Python ignores SIGXFSZ: writes get EFBIG.

  tiny = ['--config.total_steps=1', '--config.log_every_steps=1', '--config.eval_every_steps=0',
          '--config.schedule.warmup_steps=0', '--config.batch_size=16', '--config.eval_batch_size=16',
          '--config.model.width=16', '--config.model.depth=2', '--config.model.mlp_dim=32',
          '--config.model.num_heads=2', '--config.model.patch_size=4']
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}  # Its writes would fail too.
  proc = subprocess.run([sys.executable, '-m', 'train', '--config=configs/vit_digits.py', f'--workdir={tmp_path}',
                         f'--config.data.data_dir={digits_dir}', *tiny], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, preexec_fn=limit_file_size)
  (line,) = proc.stderr.splitlines()
  assert proc.returncode == cli.TRANSIENT_IO_EXIT == 74, proc.stderr[-3000:]
  assert "File too large [os_error_code='27']: an I/O failure" in line and line.startswith('error: '), line
  assert line.endswith('rerun the same command to resume from the last checkpoint')


def test_traceback_on_request_comes_before_the_line(capsys):
  with pytest.raises(SystemExit) as e:
    with cli.ending_failures(show_traceback=True):
      raise OSError(28, 'No space left on device')
  err = capsys.readouterr().err.splitlines()
  assert e.value.code == 74 and err[0] == 'Traceback (most recent call last):'
  assert err[-1].startswith('error: [Errno 28] No space left on device: an I/O failure')


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


BROKEN = {  # A config file that fails in its own code -> what the error says.
    'syntax': ('import ml_collections\ndef get_config(arg=None):\n  return ml_collections.ConfigDict(\n',
               '{path}, line 3: SyntaxError: \'(\' was never closed'),
    'import': ('import ml_collections\nfrom configs import no_such_helper\n',
               "{path}, line 2: ImportError: cannot import name 'no_such_helper' from 'configs'"),
    'name': ('def get_config(arg=None):\n  return undefined_name\n',
             "{path}, line 2: NameError: name 'undefined_name' is not defined"),
    'key': ('import ml_collections\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict()\n'
            '  return c.missing\n', "{path}, line 4: AttributeError: "),
}


@pytest.mark.parametrize('kind', BROKEN)
def test_a_config_file_that_fails_is_named_with_its_line(tmp_path, capsys, kind):
  text, message = BROKEN[kind]
  path = tmp_path / f'{kind}.py'
  path.write_text(text)
  message = message.format(path=path)
  with pytest.raises(ValueError) as e:
    cli.load_config(str(path))
  assert str(e.value).startswith(f'--config={path}: the config file failed: {message}'), str(e.value)
  line = _error_line(capsys, 2, _parse, ['prog', f'--config={path}'])
  assert line.startswith(f'error: the config file failed: {message}'), line


def test_a_config_file_without_get_config_is_told_so(tmp_path, capsys):
  path = tmp_path / 'plain.py'
  path.write_text('import ml_collections\nCONFIG = ml_collections.ConfigDict()\n')
  want = f'{path} defines no get_config(); a config file defines get_config(arg=None) that returns its ConfigDict'
  with pytest.raises(ValueError, match='the config file failed: ' + want.replace('(', r'\(').replace(')', r'\)')):
    cli.load_config(str(path))
  assert _error_line(capsys, 2, _parse, ['prog', f'--config={path}']) == f'error: the config file failed: {want}'


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
