"""NF4 with double quantisation (train/nf4.py) against bitsandbytes' CPU path, value for value, and QLoRA's frozen
base: the model that dequantises each kernel where it uses it equals the model given the dequantised kernels."""
import bitsandbytes.functional as bnb
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import mistral
from train import lora, nf4


@pytest.fixture(scope='module')
def weights():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((96, 256)).astype(np.float32) * 0.05
  x[3, :64] *= 40  # One block far larger than the rest, as outlier rows are.
  return x


def test_nf4_codes_and_absmax_equal_bitsandbytes(weights):
  packed, state = bnb.quantize_4bit(torch.from_numpy(weights), blocksize=64, quant_type='nf4')
  ours = nf4.quantize(weights)
  np.testing.assert_array_equal(np.asarray(state.code), nf4.NF4_LEVELS)  # The published code book.
  np.testing.assert_array_equal(np.asarray(ours['nf4']), packed.numpy().reshape(-1))
  # Dequantised with float32 absmaxes (no double quantisation), as bitsandbytes does.
  codes = np.stack([np.asarray(ours['nf4']) >> 4, np.asarray(ours['nf4']) & 15], -1).reshape(-1)
  np.testing.assert_array_equal(state.absmax.numpy(), np.abs(weights).reshape(-1, 64).max(-1))
  want = bnb.dequantize_4bit(packed, state).numpy()
  np.testing.assert_array_equal((nf4.NF4_LEVELS[codes].reshape(-1, 64) * state.absmax.numpy()[:, None]).reshape(
      weights.shape), want)


def test_double_quantisation_against_bitsandbytes(weights):
  """The dynamic map, the offset and the block scales equal bitsandbytes'. The 8-bit codes follow the nearest-level
  rule of bitsandbytes' reference kernel (torch.bucketize at the midpoints); its native CPU kernel searches
  approximately and picks the next level for about 2% of the values, never a nearer one."""
  _, state = bnb.quantize_4bit(torch.from_numpy(weights), blocksize=64, quant_type='nf4', compress_statistics=True)
  ours = nf4.quantize(weights)
  np.testing.assert_array_equal(nf4.DYNAMIC_MAP, bnb.create_dynamic_map().numpy())
  assert float(ours['offset']) == pytest.approx(float(state.offset), rel=1e-6)
  np.testing.assert_allclose(np.asarray(ours['scale']), state.state2.absmax.numpy(), rtol=1e-6)
  absmax = np.abs(weights).reshape(-1, 64).max(-1)
  shifted = torch.from_numpy(absmax - np.float32(state.offset))
  blocks = torch.nn.functional.pad(shifted, (0, -len(shifted) % 256)).reshape(-1, 256)
  scaled = torch.clamp(blocks * (1.0 / blocks.abs().max(-1)[0])[:, None], -1, 1).reshape(-1)[:len(shifted)]
  code = bnb.create_dynamic_map()
  reference = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).numpy()
  codes, native = np.asarray(ours['absmax']), state.absmax.numpy()
  np.testing.assert_array_equal(codes, reference)
  mine, theirs = np.abs(scaled.numpy() - code.numpy()[codes]), np.abs(scaled.numpy() - code.numpy()[native])
  assert (mine <= theirs).all() and (codes != native).mean() < 0.03 and (np.abs(codes.astype(int) - native) <= 1).all()
  got = bnb.dequantize_4bit(*bnb.quantize_4bit(torch.from_numpy(weights), blocksize=64, quant_type='nf4',
                                               compress_statistics=True)).numpy()
  restored = np.asarray(nf4.dequantize(ours, weights.shape))
  # Where the absmax codes agree, the values agree; elsewhere they differ by the one dynamic-map step.
  same = np.repeat(codes == native, 64).reshape(weights.shape)
  np.testing.assert_allclose(restored[same], got[same], rtol=1e-6, atol=1e-7)
  assert np.abs(restored - got).max() < 0.01 * np.abs(weights).max()


def test_error_bounds_and_storage(weights):
  ours = nf4.quantize(weights)
  restored = np.asarray(nf4.dequantize(ours, weights.shape))
  blocks, absmax = weights.reshape(-1, 64), np.abs(weights).reshape(-1, 64).max(-1)
  # Each value is within half the widest gap of the code book (0.3039 of its block's absmax, between -1 and
  # -0.696) plus the 8-bit absmax error, which is at most half a dynamic-map step of the scale (< 1% here).
  gap = np.max(np.diff(nf4.NF4_LEVELS)) / 2
  absmax_error = np.abs(np.asarray(nf4.dequantize_absmax(ours)) - absmax)
  assert (absmax_error <= 0.01 * np.abs(absmax).max()).all()
  bound = gap * absmax[:, None] + absmax_error[:, None] + 1e-7
  assert (np.abs(restored.reshape(-1, 64) - blocks) <= bound).all()
  # 4 bits per value, 8 per absmax of 64, 32 per scale of 256 absmaxes.
  stored = sum(np.asarray(v).nbytes for v in ours.values())
  assert stored == weights.size // 2 + weights.size // 64 + 4 * (-(-weights.size // 64 // 256)) + 4
  assert nf4.stored_bytes_per_value() == pytest.approx(4.127 / 8, abs=1e-4)
  with pytest.raises(ValueError, match="QLoRA cannot quantise 'tensor': its 100 values .* blocks of 64"):
    nf4.quantize(np.zeros(100, np.float32))


KWARGS = dict(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, sliding_window=6,
              vocab_size=61, norm_eps=1e-5, rope_theta=10000.0, attention_impl='masked')


@pytest.mark.parametrize('scan', [False, True], ids=['layers', 'scanned'])
def test_qlora_layers_dequantise_their_own_kernels(scan):
  adapter = lora.QLora(rank=4, alpha=8.0, dropout=0.0)
  model = adapter.wrap(mistral.Model(**KWARGS, scan=scan))
  init = jax.jit(lambda key: nn.unbox(model.init({'params': key}, jnp.zeros((1, 4), jnp.int32))['params']))
  params = init(jax.random.key(0))
  rng = np.random.default_rng(1)
  trainable, base = jax.jit(adapter.split)(params)  # Jitted: op by op, quantising and applying take 10x longer.
  trainable = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape) * 0.1, jnp.float32), trainable)
  flat_base = traverse_util.flatten_dict(base, sep='/')
  prefix = 'layers' if scan else 'layer_1'
  assert f'{prefix}/attn/query/kernel' not in flat_base
  assert flat_base[f'{prefix}/attn/query/kernel_nf4'].dtype == np.uint8
  assert flat_base['head/kernel'].dtype == np.float32  # Only the adapted kernels are quantised.
  tokens = jnp.asarray(rng.integers(0, 61, (2, 9)))
  ours = jax.jit(model.apply)({'params': adapter.merge(trainable, base)}, tokens)
  # The same model given plain kernels: each the dequantised NF4 kernel, plus the low-rank update.
  dense = jax.jit(adapter.export)(trainable, base)
  plain_model = mistral.Model(**KWARGS, scan=scan)
  np.testing.assert_allclose(ours, jax.jit(plain_model.apply)({'params': dense}, tokens), atol=2e-5, rtol=1e-5)
  plain = traverse_util.flatten_dict(params, sep='/')
  kernel = traverse_util.flatten_dict(dense, sep='/')[f'{prefix}/mlp/down/kernel']
  assert kernel.shape == plain[f'{prefix}/mlp/down/kernel'].shape
  line = adapter.describe(trainable, base)
  # 0.5159 bytes per parameter for a large kernel; these small ones pay for a partial block of scales each.
  stored = sum(n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4 for n in (64 * 64, 64 * 32, 64 * 32, 64 * 64,
                                                                      64 * 128, 64 * 128, 128 * 64))
  assert f'their frozen base in NF4: {2 * stored / 73_728:.4f} bytes per parameter (73,728 parameters' in line, line


def test_the_kernel_layout_holds_the_same_bytes_and_values():
  """A kernel whose last axis holds whole blocks is stored in its own shape (so it shards along its axes); the
  bytes are the flat storage's, reshaped, and dequantise to the same values, across blocks of 256 scales."""
  x = np.random.default_rng(1).standard_normal((40, 2, 256)).astype(np.float32)  # 320 absmaxes: 2 scale blocks
  flat = nf4.quantize(x)
  shaped = nf4.in_layout(flat, x.shape)
  assert shaped['nf4'].shape == (40, 2, 128) and shaped['absmax'].shape == (40, 2, 4)
  for field in nf4.FIELDS:
    np.testing.assert_array_equal(np.asarray(shaped[field]).reshape(-1), np.asarray(flat[field]).reshape(-1))
  np.testing.assert_array_equal(nf4.dequantize(shaped, x.shape), nf4.dequantize(flat, x.shape))
  assert nf4.in_layout(flat, (80, 2, 128))['nf4'].shape == (80, 2, 64)
  assert nf4.in_layout(flat, (640, 32)) is flat  # a last axis of 32 values is not whole blocks: flat
