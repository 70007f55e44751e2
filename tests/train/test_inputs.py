"""Bad input to `python -m train` ends at start-up, before anything compiles, with one `error:` line and exit 2;
a first run on a new data_dir logs no library warning."""
import logging
import os
import subprocess
import sys

import pytest

from train import build, cli, loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(config):
  return loop.check_config(config, num_devices=8, process_count=1)


@pytest.mark.parametrize('overrides, message', [
    ({'log_every_steps': 0}, 'log_every_steps=0 must be a whole number of steps >= 1; set --config.log_every_steps.'),
    ({'checkpoint_every_steps': 0}, 'checkpoint_every_steps=0 must be a whole number of steps >= 1'),
    ({'checkpoint_every_steps': -10}, 'checkpoint_every_steps=-10 must be'),
    ({'eval_every_steps': -1}, 'eval_every_steps=-1 must be a whole number of steps >= 0 (0: never evaluate)'),
    ({'schedule.base_learning_rate': -0.1}, 'schedule.base_learning_rate=-0.1 must be >= 0; set '
                                            '--config.schedule.base_learning_rate.'),
    ({'schedule.end_learning_rate': -1e-5}, 'schedule.end_learning_rate=-1e-05 must be >= 0'),
    ({'schedule.warmup_steps': -5}, 'schedule.warmup_steps=-5 must be >= 0'),
    ({'optimizer.weight_decay': -1e-4}, 'optimizer.weight_decay=-0.0001 must be >= 0'),
    ({'optimizer.grad_clip_norm': -1.0}, 'optimizer.grad_clip_norm=-1.0 must be >= 0'),
    ({'optimizer.ema_decay': 1.5}, 'optimizer.ema_decay=1.5 must be in [0, 1]'),
    ({'optimizer.b2': float('nan')}, 'optimizer.b2=nan must be in [0, 1]'),
    ({'batch_size': -16}, 'batch_size=-16 must be positive.'),
])
def test_check_config_refuses_out_of_range_values(tiny_config, overrides, message):
  with pytest.raises(ValueError) as e:
    _check(tiny_config('unused', **overrides))
  assert str(e.value).startswith(message), str(e.value)


def test_check_config_accepts_the_documented_edges(tiny_config):
  """eval_every_steps=0 (never) and a learning rate of 0 (evaluate the initial parameters) are allowed."""
  assert _check(tiny_config('unused', eval_every_steps=0, **{'schedule.base_learning_rate': 0.0,
                                                             'schedule.warmup_steps': 0})) == (8, 1, 1, 1)


def test_model_names_are_the_models():
  assert build.model_names() == ['mistral', 'nfnet', 'vit']


CONFIGS = {
    'syntax.py': 'import ml_collections\n\ndef get_config(arg=None)\n  return ml_collections.ConfigDict()\n',
    'bad_import.py': 'import ml_collections\nimport no_such_module_for_a_test\n',
    'no_get_config.py': 'import ml_collections\n\ndef config():\n  return ml_collections.ConfigDict()\n',
}


@pytest.mark.parametrize('args, line', [
    (['--config={tmp}/syntax.py'], 'error: the config file failed: {tmp}/syntax.py, line 3: SyntaxError: '
                                   "expected ':'"),
    (['--config={tmp}/bad_import.py'], 'error: the config file failed: {tmp}/bad_import.py, line 2: '
                                       "ModuleNotFoundError: No module named 'no_such_module_for_a_test'"),
    (['--config={tmp}/no_get_config.py'], 'error: the config file failed: {tmp}/no_get_config.py defines no '
                                          'get_config(); a config file defines get_config(arg=None) that returns '
                                          'its ConfigDict'),
    (['--config.modle_name=vit'], 'error: --config.modle_name: no such config field; did you mean '
                                  '--config.model_name? (new fields must be added to the config, not only '
                                  'overridden)'),
    (['--workdir={tmp}/a_file/run'], 'error: --workdir={tmp}/a_file/run is not a writable directory ([Errno 20] '
                                     "Not a directory: '{tmp}/a_file/run'); choose another --workdir or make it "
                                     'writable.'),
    (['--config.model_name=common'], "error: model_name='common' is not a model under models/; choose one of "
                                     "['mistral', 'nfnet', 'vit']. (--traceback for details)"),
    (['--config.checkpoint_every_steps=0'], 'error: checkpoint_every_steps=0 must be a whole number of steps >= 1; '
                                            'set --config.checkpoint_every_steps. (--traceback for details)'),
    (['--config.mesh.sequence=2'], "error: mesh.sequence=2: model_name='vit' has no token axis to split over devices "
                                   '(sequence parallelism is for token models: their module defines '
                                   'check_sequence_split); set --config.mesh.sequence=1. (--traceback for details)'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, line):
  for name, text in CONFIGS.items():
    (tmp_path / name).write_text(text)
  (tmp_path / 'a_file').write_text('')
  args = [a.format(tmp=tmp_path) for a in args]
  defaults = {'--config=': 'configs/vit_digits.py', '--workdir=': f'{tmp_path}/w'}
  command = [sys.executable, '-m', 'train',
             *(k + v for k, v in defaults.items() if not any(a.startswith(k) for a in args)), *args]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert (proc.returncode, proc.stderr.splitlines()) == (2, [line.format(tmp=tmp_path)]), proc.stderr[-3000:]


def test_the_first_run_on_a_new_data_dir_logs_no_warning(tmp_path, caplog):
  """tfds warns 'Variant folder ... has no dataset_info.json' when asked whether a dataset not yet built is
  prepared, which is every first run of our own builders."""
  from data import sources
  with caplog.at_level(logging.WARNING):
    assert len(sources.get_source('digits', 'test', str(tmp_path))) == 360
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize('spec, overrides, message', [
    ('configs/nfnet_digits.py', {}, r"^mesh.sequence=2: model_name='nfnet' has no token axis to split"),
    ('configs/mistral_tiny.py', {'data.seq_len': 101}, r'^the row length 101 is not divisible by the sequence axis '
                                                       r'\(2 devices\)'),
    ('configs/mistral_tiny.py', {'data.seq_len': 32}, r'^sliding_window=64 is larger than the whole row \(32 tokens\)'),
    ('configs/mistral_tiny.py', {'sharding_rules.length': ''}, r"^mesh.sequence=2 but sharding_rules.length='' does "
                                                               'not name it'),
])
def test_a_sequence_axis_the_run_cannot_split_is_one_line(spec, overrides, message):
  config = cli.load_config(spec, [f'--config.{k}={v}' for k, v in {'mesh.sequence': 2, **overrides}.items()])
  with pytest.raises(ValueError, match=message) as e:
    loop.check_config(config, num_devices=8, process_count=1)
  assert '\n' not in str(e.value)
