"""Fixtures shared by the tests of train/."""
import pytest

from configs import mistral_tiny, vit_digits


def _tiny_vit_config(data_dir, **overrides):
  """vit_digits shrunk to a model that compiles and steps in well under a second; `overrides` by dotted name."""
  c = vit_digits.get_config()
  c.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4)
  c.data.data_dir = data_dir
  c.batch_size = c.eval_batch_size = 16
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 1, 0, 3
  c.schedule.warmup_steps = 1
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


@pytest.fixture(scope='session')
def tiny_config():
  """fn(data_dir, **{'dotted.name': value}) -> the tiny digits ViT config (see _tiny_vit_config)."""
  return _tiny_vit_config


@pytest.fixture
def tiny_mistral_config(tmp_path):
  """configs/mistral_tiny.py shrunk to 2 layers of width 32 (window 8, rows of 32 tokens, batch 8), on a small
  corpus written under tmp_path; the caller sets the run's length."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(60):  # Enough files that the hash split gives a validation document.
    (corpus / f'doc{i:02d}.txt').write_text(f'Document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (i % 7 + 3))
  c = mistral_tiny.get_config()
  c.model.update(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                 sliding_window=8, block_size=8)
  c.data.update(files=str(corpus / '*.txt'), data_dir=str(tmp_path / 'tfds'), seq_len=32, num_threads=1, prefetch=1)
  c.batch_size = c.eval_batch_size = 8
  return c
