"""Checkpoint restore: a checkpoint of another process count or model is refused in one line and kept; an
unreadable newest step is moved aside and the run resumes from the step before it."""
import copy
import os
import shutil

import jax
import pytest

from train import checkpoint, loop
from train import metrics as metrics_lib


def test_data_process_counts_read_grain_state_names(tmp_path):
  assert checkpoint.data_process_counts(str(tmp_path / 'missing')) == []
  data = tmp_path / '8' / 'data'
  data.mkdir(parents=True)
  assert checkpoint.data_process_counts(str(tmp_path / '8')) == []
  for name in ('process_0-of-4.json', 'process_3-of-4.json', 'notes.txt'):
    (data / name).write_text('{}')
  assert checkpoint.data_process_counts(str(tmp_path / '8')) == [4]


def test_resume_with_another_process_count_is_a_one_line_error(digits_dir, tmp_path, monkeypatch, tiny_config):
  c = tiny_config(digits_dir, total_steps=1, checkpoint_every_steps=1, **{'model.depth': 1, 'schedule.warmup_steps': 0})
  loop.train(c, str(tmp_path))  # One process: checkpoints/1/data/process_0-of-1.json.
  assert checkpoint.data_process_counts(str(tmp_path / 'checkpoints' / '1')) == [1]

  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  try:
    with monkeypatch.context() as m:  # As if resumed by 2 processes (only around the check: orbax would sync).
      m.setattr(jax, 'process_count', lambda: 2)
      with pytest.raises(ValueError) as e:
        checkpointer.restore(1, abstract_state=None, data_iter=iter(()))
  finally:
    checkpointer.close()
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'{tmp_path}/checkpoints/1 was written by 1 process ')
  assert 'resumes only with as many, not 2: rerun with 1 process, or start over in a new --workdir.' in message


# A corrupt newest step: how each way of breaking it is done to checkpoints/STEP.
def _truncate_arrays(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in str(p)]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])


def _delete_arrays(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in str(p)]
  assert files
  for p in files:
    p.unlink()


def _garbage(*names):
  def corrupt(step_dir):
    for name in names:
      paths = list(step_dir.glob(name))
      assert paths, name
      for p in paths:
        p.write_text('{garbage')
  return corrupt


CORRUPTIONS = {
    'truncated arrays': _truncate_arrays,
    'deleted arrays': _delete_arrays,
    'garbage item metadata': _garbage('state/_METADATA'),
    'garbage manifest': _garbage('state/manifest.ocdbt'),
    'garbage data position': _garbage('data/process_0-of-1.json'),
}


@pytest.fixture(scope='module')
def three_steps(digits_dir, tmp_path_factory, tiny_config):
  """A finished 3-step run with a checkpoint at every step, and its config."""
  config = tiny_config(digits_dir, checkpoint_every_steps=1, **{'model.depth': 1})
  path = tmp_path_factory.mktemp('three_steps')
  loop.train(config, str(path))
  return path, config


def _copy(three_steps, tmp_path):
  path, config = three_steps
  shutil.copytree(path, tmp_path / 'w')
  return tmp_path / 'w', copy.deepcopy(config)


@pytest.mark.parametrize('corrupt', CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_an_unreadable_newest_step_is_moved_aside_and_the_run_resumes_before_it(three_steps, tmp_path, capsys, corrupt):
  w, config = _copy(three_steps, tmp_path)
  corrupt(w / 'checkpoints' / '3')
  out = loop.train(config, str(w))
  assert out['step'] == 3
  printed = capsys.readouterr()
  assert f'resumed from {w}/checkpoints at step 2' in printed.out
  assert 'Traceback' not in printed.err and 'Event loop is closed' not in printed.err
  (warning,) = [l for l in printed.err.splitlines() if 'warning' in l or 'error' in l]
  assert warning.startswith(f'warning: checkpoint step 3 in {w}/checkpoints cannot be read (')
  assert warning.endswith(f'); moved it to {w}/checkpoints.unreadable/3, trying the step before it.')
  assert sorted(os.listdir(w / 'checkpoints.unreadable')) == ['3']
  assert sorted(int(s) for s in os.listdir(w / 'checkpoints') if s.isdigit()) == [1, 2, 3]
  assert [r['step'] for r in metrics_lib.read_metrics(str(w))] == [1, 2, 3]


def test_garbage_step_metadata_alone_leaves_the_step_readable(three_steps, tmp_path, capsys):
  # orbax restores a step without its _CHECKPOINT_METADATA (it logs that file's parse error): the run resumes
  # from the step exactly, so nothing is moved aside.
  w, config = _copy(three_steps, tmp_path)
  _garbage('_CHECKPOINT_METADATA')(w / 'checkpoints' / '3')
  assert loop.train(config, str(w))['step'] == 3
  assert f'resumed from {w}/checkpoints at step 3' in capsys.readouterr().out
  assert not os.path.exists(w / 'checkpoints.unreadable')


def test_an_empty_newer_step_directory_is_moved_aside(three_steps, tmp_path, capsys):
  w, config = _copy(three_steps, tmp_path)
  (w / 'checkpoints' / '7').mkdir()
  assert loop.train(config, str(w))['step'] == 3
  printed = capsys.readouterr()
  assert f'resumed from {w}/checkpoints at step 3' in printed.out
  assert f'moved it to {w}/checkpoints.unreadable/7,' in printed.err
  assert os.listdir(w / 'checkpoints.unreadable') == ['7']


def test_no_readable_step_stops_with_one_line_also_on_the_next_start(three_steps, tmp_path, capsys):
  w, config = _copy(three_steps, tmp_path)
  for step in (1, 2, 3):
    _delete_arrays(w / 'checkpoints' / str(step))
  for attempt in range(2):  # Then again, with checkpoints/ empty: never a silent restart from scratch.
    with pytest.raises(checkpoint.UnreadableCheckpointError) as e:
      loop.train(config, str(w))
    assert str(e.value) == (
        f'no readable checkpoint in {w}/checkpoints; the unreadable steps 1, 2, 3 were moved to '
        f'{w}/checkpoints.unreadable. Move one back if it can be repaired, or delete {w}/checkpoints.unreadable '
        'to start over from scratch.')
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning:')]
    assert len(warnings) == (3 if attempt == 0 else 0)
  assert not os.path.exists(w / 'lock')


@pytest.mark.parametrize('overrides, message', [
    ({'model.mlp_dim': 64}, "holds another model: parameter 'encoder/block_0/mlp/fc1/bias' has shape (32,) there "
                            'but (64,) in this model; resume with the config it was trained with'),
    ({'optimizer.name': 'sgd', 'optimizer.momentum': 0.9},
     "holds another training state: 'opt_state/"),
], ids=['model', 'optimizer'])
def test_a_checkpoint_of_another_run_is_refused_before_reading_arrays_and_kept(three_steps, tmp_path, overrides,
                                                                                message):
  w, config = _copy(three_steps, tmp_path)
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  record = (w / 'config.json').read_bytes()
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
    loop.train(config, str(w))
  assert str(e.value).startswith(f'{w} {message}') and '\n' not in str(e.value)
  assert (w / 'config.json').read_bytes() == record
  assert not os.path.exists(w / 'checkpoints.unreadable') and not os.path.exists(w / 'lock')


def test_only_damaged_files_count_as_unreadable():
  # What says nothing about the files (memory, permissions, a network that may come back) ends the run instead.
  assert checkpoint._not_the_files_fault(PermissionError(13, 'Permission denied'))
  assert checkpoint._not_the_files_fault(ValueError('UNAVAILABLE: connection reset'))
  assert checkpoint._not_the_files_fault(MemoryError())
  try:
    try:
      raise TimeoutError('read timed out')
    except TimeoutError as cause:
      raise ValueError('Encountered error while reading array index') from cause
  except ValueError as e:
    assert checkpoint._not_the_files_fault(e)
  assert not checkpoint._not_the_files_fault(FileNotFoundError(2, 'No such file or directory'))
  assert not checkpoint._not_the_files_fault(ValueError('DATA_LOSS: Error decoding manifest'))
  assert not checkpoint._not_the_files_fault(KeyError('Item "meta" was not found in the checkpoint.'))
