"""Checkpoint restore refuses, in one line, a checkpoint whose data positions belong to another process count."""
import jax
import pytest

from train import checkpoint, loop


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
