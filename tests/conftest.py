"""Shared test setup: 8 CPU devices for sharding tests, float32 matmuls, and the digits data built once."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax initialises its backends.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One compilation cache for the session and the commands it starts: many tests compile the same steps
# (a run and its resumed twin, a command and its rerun). A fresh directory, removed at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jax_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from data import pipeline  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """A TFDS data_dir holding the prepared `digits` dataset (built on first use, offline)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  pipeline.get_source('digits', 'train', data_dir)
  return data_dir


def _to_original_format(hf_sd: dict, head_dim: int) -> dict:
  """HF names/layout -> the original release's, written from the documented conversion rule:
  within each head, HF query/key row j came from original row 2j and row head_dim/2 + j from 2j+1."""
  top = {'model.embed_tokens.weight': 'tok_embeddings.weight', 'model.norm.weight': 'norm.weight',
         'lm_head.weight': 'output.weight'}
  inner = {'input_layernorm': 'attention_norm', 'post_attention_layernorm': 'ffn_norm',
           'self_attn.q_proj': 'attention.wq', 'self_attn.k_proj': 'attention.wk',
           'self_attn.v_proj': 'attention.wv', 'self_attn.o_proj': 'attention.wo',
           'mlp.gate_proj': 'feed_forward.w1', 'mlp.up_proj': 'feed_forward.w3',
           'mlp.down_proj': 'feed_forward.w2'}
  out = {}
  for name, w in hf_sd.items():
    if name in top:
      out[top[name]] = w
      continue
    _, _, i, rest = name.split('.', 3)
    module = rest[:-len('.weight')]
    if module in ('self_attn.q_proj', 'self_attn.k_proj'):
      original = np.empty_like(w)
      half = head_dim // 2
      for h in range(w.shape[0] // head_dim):
        for j in range(half):
          original[h * head_dim + 2 * j] = w[h * head_dim + j]
          original[h * head_dim + 2 * j + 1] = w[h * head_dim + half + j]
      w = original
    out[f'layers.{i}.{inner[module]}.weight'] = w
  return out


@pytest.fixture(scope='session')
def original_state_dict():
  """Mistral HF state dict (numpy) -> original-release names and RoPE row layout: fn(hf_sd, head_dim)."""
  return _to_original_format
