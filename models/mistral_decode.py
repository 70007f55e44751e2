"""Generation with the Mistral decoder's rolling KV cache (models/mistral.py): `generate` and `sample_logits`.

`generate(model, params, prompt, max_new_tokens, ...)`: greedy decoding, or top-k / top-p sampling, of prompts
of different lengths (per-row positions, keys and stops at EOS), with a cache of `sliding_window` slots per layer
(`mistral.init_cache`), a chunked prefill and a jitted lax.while_loop decode. Both functions are also reached as
`models.mistral.generate` and `models.mistral.sample_logits`, the names they have always had.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import mistral


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Next tokens [b] from logits [b, vocab]: argmax at temperature 0, else top-k/top-p sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Smallest prefix whose mass reaches top_p; the most likely token is always kept.
    keep = (mass_before < top_p).at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], -1)[:, 0]


@functools.partial(jax.jit, static_argnums=0)
def _prefill_chunk(model: mistral.Model, params: mistral.Params, tokens: jax.Array, positions: jax.Array,
                   cache: mistral.Cache) -> tuple[jax.Array, mistral.Cache]:
  logits, cache = model.apply({'params': params}, tokens, positions, cache, method='decode')
  return logits[:, -1], cache


def _pick(logits: jax.Array, rng: jax.Array | None, i: jax.Array, temperature: float,
          top_k: int | None, top_p: float | None) -> jax.Array:
  """Tokens [b] for generation step i: one key folded with i, or per-row keys [b] each folded with i.

  Per-row keys sample each row exactly as a batch of one would (a [1, vocab] draw per key), so a
  row's sample depends on its own key only.
  """
  if rng is None:
    return sample_logits(logits, None, temperature, top_k, top_p)
  if _is_key_batch(rng):
    one = lambda l, k: sample_logits(l[None], jax.random.fold_in(k, i), temperature, top_k, top_p)[0]
    return jax.vmap(one)(logits, rng)
  return sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)


def _is_key_batch(rng: jax.Array) -> bool:
  """True for a batch of keys [b] (typed) or [b, 2] (raw uint32), False for one key."""
  key_ndim = 0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1
  return rng.ndim == key_ndim + 1


def _decode_loop(model: mistral.Model, params: mistral.Params, logits: jax.Array, cache: mistral.Cache,
                 start: jax.Array, rng: jax.Array | None, eos_id: jax.Array, pad_id: jax.Array,
                 steps: int, temperature: float, top_k: int | None, top_p: float | None):
  """Samples up to `steps` tokens per row; row r's token i is fed back at position start[r] + i.

  A row stops after emitting eos_id (never when it is negative): its later tokens are pad_id with
  log-probability 0. The lax.while_loop ends once every row stopped.
  """
  b = logits.shape[0]

  def record(logits, i, out, lps, done):
    tok = _pick(logits, rng, i, temperature, top_k, top_p)
    lp = _token_logprob(logits, tok)
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    lps = lps.at[:, i].set(jnp.where(done, 0.0, lp))
    return tok, out, lps, done | (tok == eos_id)

  out = jnp.full((b, steps), pad_id, jnp.int32)
  lps = jnp.zeros((b, steps), jnp.float32)
  tok, out, lps, done = record(logits, 0, out, lps, jnp.zeros((b,), bool))

  def body(state):
    i, tok, out, lps, done, cache = state
    # Stopped rows keep feeding their last sampled token: valid ids, outputs discarded.
    logits, cache = model.apply({'params': params}, tok[:, None], (start + i - 1)[:, None], cache,
                                method='decode')
    tok, out, lps, done = record(logits[:, -1], i, out, lps, done)
    return i + 1, tok, out, lps, done, cache

  def more(state):
    i, _, _, _, done, _ = state
    return (i < steps) & ~jnp.all(done)

  _, _, out, lps, _, cache = jax.lax.while_loop(more, body, (1, tok, out, lps, done, cache))
  return out, lps, cache


_decode_loop_jit = jax.jit(_decode_loop, static_argnums=0,
                           static_argnames=('steps', 'temperature', 'top_k', 'top_p'))


def _check_lengths(prompt_lengths: Any, b: int, t: int) -> np.ndarray:
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f'prompt_lengths must be integers of shape ({b},) (one per prompt row), got '
                     f'{lengths.dtype} {lengths.shape}')
  if lengths.min() < 1 or lengths.max() > t:
    raise ValueError(f'prompt_lengths must lie in [1, {t}] (the padded prompt width), got '
                     f'{lengths.min()}..{lengths.max()}')
  return lengths.astype(np.int32)


def _check_rng(rng: jax.Array | None, b: int) -> jax.Array | None:
  if rng is None:
    return None
  rng = jnp.asarray(rng)
  if _is_key_batch(rng) and rng.shape[0] != b:
    raise ValueError(f'rng holds {rng.shape[0]} keys for {b} prompt rows; pass one key or one per row')
  return rng


def generate(model: mistral.Model, params: mistral.Params, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None,
             prefill_chunk: int | None = None, top_k: int | None = None,
             top_p: float | None = None, return_state: bool = False,
             prompt_lengths: Any = None, eos_id: int | None = None, pad_id: int = 0) -> Any:
  """Autoregressive generation with a rolling-buffer KV cache (see `mistral.init_cache`).

  prompt: int [batch, t]. With prompt_lengths (int [batch], each in [1, t]) row r's prompt is
  prompt[r, :prompt_lengths[r]] (right-padded, any pad value); without, every row is t long.
  Greedy at temperature 0 (top_k/top_p ignored); otherwise samples from softmax(logits /
  temperature) restricted to the top_k tokens and/or the smallest top_p nucleus, with `rng`
  (required): one key, or one key per row ([batch] keys) so that a row's sample depends only on
  its key and equals that row generated alone with it. A row stops after emitting eos_id (kept);
  the loop ends once every row stopped.

  Every row is generated exactly as if alone: the prompts are right-aligned for the prefill
  (padding at negative positions, which the cache treats as empty), so each row decodes at its
  own positions. The prefill runs in chunks of `prefill_chunk` tokens (None: one chunk), the
  decoding one position at a time in a jitted lax.while_loop. Works for scan=True/False params.

  Returns tokens [batch, t + max_new_tokens]: row r's prompt, its generated tokens from index
  prompt_lengths[r], then pad_id. With return_state=True, also the float32 log-probabilities
  [batch, max_new_tokens] of each row's generated tokens under the untempered model (0 after it
  stopped), and the final cache.
  """
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if temperature > 0 and rng is None:
    raise ValueError('temperature > 0 requires an rng key for sampling')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k must be >= 1, got {top_k}')
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if prefill_chunk is not None and prefill_chunk < 1:
    raise ValueError(f'prefill_chunk must be >= 1, got {prefill_chunk}')
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2:
    raise ValueError(f'prompt must be int [batch, length], got shape {prompt.shape}')
  b, t = prompt.shape
  if t < 1 or max_new_tokens < 0:
    raise ValueError(f'need a non-empty prompt and max_new_tokens >= 0, got {t}, {max_new_tokens}')
  lengths = np.full((b,), t, np.int32) if prompt_lengths is None else _check_lengths(prompt_lengths, b, t)
  rng = None if temperature == 0 else _check_rng(rng, b)
  lengths_j = jnp.asarray(lengths)
  in_prompt = jnp.arange(t)[None] < lengths_j[:, None]
  prompt = jnp.where(in_prompt, prompt, pad_id)
  cache = mistral.init_cache(model, b, t + max_new_tokens)
  if max_new_tokens == 0:
    return (prompt, jnp.zeros((b, 0), jnp.float32), cache) if return_state else prompt

  # Right-align: row r's token k sits at index k + t - len_r, so every row's last prompt token is
  # at index t - 1. The padding before it gets negative positions: keys there count as empty.
  positions = jnp.arange(t, dtype=jnp.int32)[None] - (t - lengths_j)[:, None]
  aligned = jnp.take_along_axis(prompt, jnp.maximum(positions, 0), axis=1)
  aligned = jnp.where(positions >= 0, aligned, 0)  # a valid id, whatever the pad value was
  chunk = prefill_chunk or t
  for s in range(0, t, chunk):
    e = min(s + chunk, t)
    logits, cache = _prefill_chunk(model, params, aligned[:, s:e], positions[:, s:e], cache)
  cache = {**cache, 'pos': jnp.maximum(cache['pos'], -1)}  # padding's slots read as empty
  if temperature == 0:
    top_k = top_p = None  # ignored when greedy; avoids extra compiles
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  new, lps, cache = _decode_loop_jit(model, params, logits, cache, lengths_j, rng, eos,
                                     jnp.int32(pad_id), steps=max_new_tokens,
                                     temperature=float(temperature), top_k=top_k, top_p=top_p)
  # Row r: its prompt, then its new tokens from index len_r, then pad_id.
  index = jnp.arange(t + max_new_tokens)[None]
  gen = index - lengths_j[:, None]
  from_new = jnp.take_along_axis(new, jnp.clip(gen, 0, max_new_tokens - 1), axis=1)
  from_prompt = jnp.take_along_axis(prompt, jnp.minimum(index, t - 1), axis=1)
  tokens = jnp.where(gen < 0, from_prompt, jnp.where(gen < max_new_tokens, from_new, pad_id))
  return (tokens, lps, cache) if return_state else tokens
