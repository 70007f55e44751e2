"""Tests for models.mistral.generate: rolling-buffer KV cache, chunked prefill, sampling, HF parity."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import mistral, mistral_weights

KWARGS = dict(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
              sliding_window=3, vocab_size=61, norm_eps=1e-5, rope_theta=10000.0)
NEW = 12  # generated tokens: several times past the window


def _params(window: int | None, seed: int = 0) -> dict:
  model = mistral.Model(**{**KWARGS, 'sliding_window': window})
  params = nn.meta.unbox(model.init({'params': jax.random.key(seed)},
                                    jnp.zeros((1, 4), jnp.int32))['params'])
  # Random norm scales and larger weights than the init, so the argmax is well separated.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(
      rng.normal(1.0, 0.5, x.shape) if x.ndim == 1 else np.asarray(x) * 4, np.float32), params)


def _prompt(b: int, t: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, KWARGS['vocab_size'], (b, t)).astype(np.int32)


def _rescored(model: mistral.Model, params: dict, tokens: np.ndarray, t: int) -> np.ndarray:
  """Log-probabilities of tokens[:, t:] from ONE uncached forward pass over the full sequence."""
  logp = jax.nn.log_softmax(jax.jit(model.apply)({'params': params}, tokens), axis=-1)
  return np.take_along_axis(np.asarray(logp[:, t - 1:-1]), tokens[:, t:, None], -1)[..., 0]


def _hf(window: int | None, params: dict) -> transformers.MistralForCausalLM:
  config, sd = mistral_weights.to_hf({**KWARGS, 'sliding_window': window}, params)
  config = transformers.MistralConfig(**{k: v for k, v in config.items()
                                         if k not in ('model_type', 'architectures')},
                                      attn_implementation='eager', bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
  model = transformers.MistralForCausalLM(config).float().eval()
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
  return model


@pytest.mark.parametrize('window,t', [(3, 7), (4, 9), (None, 7)])
def test_greedy_cache_matches_rescoring_and_hf(window, t):
  params = _params(window)
  model = mistral.Model(**{**KWARGS, 'sliding_window': window})
  prompt = _prompt(2, t)
  tokens, logprobs, cache = mistral.generate(model, params, prompt, NEW, return_state=True)
  tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
  assert tokens.shape == (2, t + NEW) and logprobs.shape == (2, NEW)
  np.testing.assert_array_equal(tokens[:, :t], prompt)
  np.testing.assert_allclose(logprobs, _rescored(model, params, tokens, t), atol=1e-5, rtol=0)

  # Constant-size rolling buffer: S = W slots (all positions without a window), holding the
  # last S positions fed to the model (the last generated token is never fed back).
  slots = t + NEW if window is None else window
  assert cache['k'].shape == cache['v'].shape == (2, 2, slots, 2, 8)
  last = t + NEW - 1
  want_pos = np.arange(last - slots, last) if window else np.r_[np.arange(last), -1]
  np.testing.assert_array_equal(np.sort(np.asarray(cache['pos']), axis=1),
                                np.broadcast_to(np.sort(want_pos), (2, slots)))

  # Chunked prefill (chunks of 5: the last one is shorter, and longer than W) agrees.
  chunked, chunked_lp, _ = mistral.generate(model, params, prompt, NEW, prefill_chunk=5,
                                            return_state=True)
  np.testing.assert_array_equal(np.asarray(chunked), tokens)
  np.testing.assert_allclose(np.asarray(chunked_lp), logprobs, atol=1e-5, rtol=0)

  # HF greedy generate on the same weights. Its sliding-window cache keeps W - 1 past
  # keys plus the current token, i.e. exactly W keys per query, as here.
  with torch.no_grad():
    want = _hf(window, params).generate(torch.from_numpy(prompt).long(), max_new_tokens=NEW,
                                        min_new_tokens=NEW, do_sample=False,
                                        attention_mask=torch.ones(prompt.shape, dtype=torch.long))
  np.testing.assert_array_equal(tokens, want.numpy())


def test_scan_params_generate_same():
  params = _params(4, seed=1)
  prompt = _prompt(2, 9, seed=1)
  want = mistral.generate(mistral.Model(**{**KWARGS, 'sliding_window': 4}), params, prompt, NEW)
  scan_model = mistral.Model(**{**KWARGS, 'sliding_window': 4}, scan=True)
  got, logprobs, cache = mistral.generate(scan_model, mistral_weights.stack_layers(params), prompt, NEW,
                                          prefill_chunk=5, return_state=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert cache['k'].shape == (2, 2, 4, 2, 8)
  np.testing.assert_allclose(np.asarray(logprobs),
                             _rescored(scan_model, mistral_weights.stack_layers(params), np.asarray(got), 9),
                             atol=1e-5, rtol=0)


def test_sampling_limits_equal_greedy():
  params = _params(3)
  model = mistral.Model(**KWARGS)
  prompt = _prompt(2, 7)
  greedy = np.asarray(mistral.generate(model, params, prompt, NEW))
  rng = jax.random.key(0)
  top1 = mistral.generate(model, params, prompt, NEW, temperature=1.0, rng=rng, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  nucleus = mistral.generate(model, params, prompt, NEW, temperature=1.0, rng=rng, top_p=1e-6)
  np.testing.assert_array_equal(np.asarray(nucleus), greedy)


def test_sample_logits_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = jax.jit(jax.vmap(lambda k: mistral.sample_logits(logits, k, 1.0, top_k=2)))
  assert set(np.unique(np.asarray(draw(keys)))) == {0, 1}
  draw = jax.jit(jax.vmap(lambda k: mistral.sample_logits(logits, k, 1.0, top_p=0.7)))
  assert set(np.unique(np.asarray(draw(keys)))) == {0, 1}  # 0.5 < 0.7 <= 0.8


def test_temperature_without_rng_raises():
  model = mistral.Model(**KWARGS)
  with pytest.raises(ValueError, match='rng'):
    mistral.generate(model, {}, _prompt(1, 3), 2, temperature=0.7)


LENGTHS = (3, 9, 17)  # longer than the window of 4, and with NEW tokens the rolling buffer wraps


def _ragged(lengths=LENGTHS, pad=-7, seed=2) -> tuple[np.ndarray, list[np.ndarray]]:
  """A right-padded batch (pad: an id outside the vocabulary) and its prompts alone."""
  alone = [_prompt(1, n, seed + i)[0] for i, n in enumerate(lengths)]
  batch = np.full((len(lengths), max(lengths)), pad, np.int32)
  for row, p in zip(batch, alone):
    row[:len(p)] = p
  return batch, alone


@pytest.mark.parametrize('scan, chunk', [(False, None), (True, 5)])
def test_ragged_greedy_equals_each_prompt_alone_and_hf(scan, chunk):
  params = _params(4, seed=2)
  model = mistral.Model(**{**KWARGS, 'sliding_window': 4}, scan=scan)
  run_params = mistral_weights.stack_layers(params) if scan else params
  batch, alone = _ragged()
  tokens, logprobs, _ = mistral.generate(model, run_params, batch, NEW, prompt_lengths=LENGTHS, pad_id=-1,
                                         prefill_chunk=chunk, return_state=True)
  tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
  assert tokens.shape == (3, 17 + NEW) and logprobs.shape == (3, NEW)
  hf = _hf(4, params)
  for row, lp, p in zip(tokens, logprobs, alone):
    want, want_lp, _ = mistral.generate(model, run_params, p[None], NEW, return_state=True)
    np.testing.assert_array_equal(row[:len(p) + NEW], np.asarray(want)[0])
    np.testing.assert_array_equal(row[len(p) + NEW:], -1)
    # Tokens are equal exactly; log-probabilities to 1e-4: XLA's CPU matmul kernels tile a batch of 3 and a
    # batch of 1 differently, and on some CPUs the rows then differ by up to 5e-5 (seen before any change here).
    np.testing.assert_allclose(lp, np.asarray(want_lp)[0], atol=1e-4, rtol=0)
    with torch.no_grad():
      want_hf = hf.generate(torch.from_numpy(p[None]).long(), max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False, attention_mask=torch.ones((1, len(p)), dtype=torch.long))
    np.testing.assert_array_equal(row[:len(p) + NEW], want_hf.numpy()[0])


def test_ragged_sampling_with_row_keys_equals_each_row_alone():
  params = _params(4, seed=3)
  model = mistral.Model(**{**KWARGS, 'sliding_window': 4})
  batch, alone = _ragged(seed=5)
  keys = jax.random.split(jax.random.key(7), 3)
  options = dict(temperature=0.9, top_p=0.9)
  tokens = np.asarray(mistral.generate(model, params, batch, NEW, prompt_lengths=LENGTHS, rng=keys, **options))
  for row, p, key in zip(tokens, alone, keys):
    want = mistral.generate(model, params, p[None], NEW, rng=key, **options)
    np.testing.assert_array_equal(row[:len(p) + NEW], np.asarray(want)[0])
  # A batch of one key per row is the same as that one key (raw uint32 keys too).
  raw = jax.random.PRNGKey(3)
  one = mistral.generate(model, params, alone[0][None], NEW, rng=raw, **options)
  np.testing.assert_array_equal(np.asarray(mistral.generate(model, params, alone[0][None], NEW, rng=raw[None],
                                                            **options)), np.asarray(one))
  greedy = np.asarray(mistral.generate(model, params, batch, NEW, prompt_lengths=LENGTHS))
  assert (tokens != greedy).any()  # the samples do differ from the argmax


def test_eos_stops_a_row_and_pads_after_it():
  params = _params(4, seed=2)
  model = mistral.Model(**{**KWARGS, 'sliding_window': 4})
  batch, _ = _ragged()
  free, free_lp, _ = mistral.generate(model, params, batch, NEW, prompt_lengths=LENGTHS, return_state=True)
  free, free_lp = np.asarray(free), np.asarray(free_lp)
  # EOS: the token row 1 emits 4th, chosen so that it appears in no other row's first 4 tokens.
  first = [free[r, n:n + NEW] for r, n in enumerate(LENGTHS)]
  eos = int(first[1][3])
  stop = [int(np.argmax(g == eos)) + 1 if (g == eos).any() else NEW for g in first]
  assert stop[1] <= 4 and min(stop) < NEW and max(stop) > stop[1], stop
  got, lp, _ = mistral.generate(model, params, batch, NEW, prompt_lengths=LENGTHS, eos_id=eos, pad_id=60,
                                return_state=True)
  got, lp = np.asarray(got), np.asarray(lp)
  for r, n in enumerate(LENGTHS):
    k = stop[r]
    np.testing.assert_array_equal(got[r, :n + k], free[r, :n + k])  # up to and including its EOS
    np.testing.assert_array_equal(got[r, n + k:], 60)
    np.testing.assert_allclose(lp[r, :k], free_lp[r, :k], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(lp[r, k:], 0.0)


@pytest.mark.parametrize('lengths, message', [
    ((0, 3), r'prompt_lengths must lie in \[1, 4\]'),
    ((2, 5), r'prompt_lengths must lie in \[1, 4\]'),
    ((2, 3, 4), r'prompt_lengths must be integers of shape \(2,\)'),
    ((2.0, 3.0), r'prompt_lengths must be integers of shape \(2,\)'),
])
def test_bad_prompt_lengths_raise(lengths, message):
  with pytest.raises(ValueError, match=message):
    mistral.generate(mistral.Model(**KWARGS), {}, _prompt(2, 4), 2, prompt_lengths=lengths)


def test_wrong_number_of_row_keys_raises():
  with pytest.raises(ValueError, match='rng holds 3 keys for 2 prompt rows'):
    mistral.generate(mistral.Model(**KWARGS), {}, _prompt(2, 4), 2, temperature=1.0,
                     rng=jax.random.split(jax.random.key(0), 3))
