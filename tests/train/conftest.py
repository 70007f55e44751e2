"""Fixtures shared by the tests of train/."""
import pytest

from configs import mistral_tiny


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
