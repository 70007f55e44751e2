"""Mistral decoder (sliding-window GQA transformer) in Flax Linen (weight converters: mistral_weights.py).

Usage::

  model = Model(**model_kwargs)  # e.g. from `mistral_weights.from_hf(hf_config, state_dict)`
  params = nn.meta.unbox(model.init({'params': key}, tokens)['params'])
  logits = model.apply({'params': params}, tokens)  # float32 [b, t, vocab]

Packed sequences: pass `segment_ids` [b, t] (tokens attend only within their
segment; use 0 for padding) and `positions` [b, t] restarting at 0 per segment.
RoPE and the sliding window use `positions`; causality uses the token index.

Generation: `generate(model, params, prompt, max_new_tokens, ...)` (models/mistral_decode.py, also
reached as `mistral.generate`) with a rolling-buffer KV cache of `sliding_window` slots per layer (see
`init_cache`), passed as an explicit pytree through `model.apply(..., tokens, positions, cache, method='decode')`.

Every parameter is boxed with logical axis names ('vocab', 'embed', 'heads',
'kv_heads', 'head_dim', 'mlp', and 'layers' when scanned); the residual stream
is constrained to ('batch', 'length', 'act_embed'), a no-op without a mesh/rules.
"""
from collections.abc import Mapping
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from models import common

RESIDUAL_AXES = ('batch', 'length', 'act_embed')
EMBED_STD = 0.02  # HF initializer_range
REMAT_POLICIES: dict[str, Any] = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_proj': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj', 'out_proj'),
}
Params = dict[str, Any]
Cache = dict[str, jax.Array]
NOISE_LENGTHS = ('segment', 'padded')  # NEFTune's L: each segment's own length, or the padded row's


# Every Mistral projection: `x @ kernel` without bias, kernel ~ truncated normal of variance 1 / fan_in.
# Called as _projection(out_shape, kernel_axes, num_in, dtype, name=...).
FAN_IN_INIT = functools.partial(nn.initializers.variance_scaling, 1.0, 'fan_in', 'truncated_normal')
_projection = functools.partial(common.Projection, use_bias=False, kernel_init=FAN_IN_INIT)


def attention_mask(q_idx: jax.Array, k_idx: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                   q_seg: jax.Array, k_seg: jax.Array, window: int | None) -> jax.Array:
  """Boolean [..., tq, tk]: causal (by index), same segment, and q_pos - k_pos < window.

  Inputs are [..., tq] for queries and [..., tk] for keys; keys with index < 0 are
  padding. The window admits exactly `window` keys including the query itself.
  """
  qi, ki = q_idx[..., :, None], k_idx[..., None, :]
  mask = (ki <= qi) & (ki >= 0) & (q_seg[..., :, None] == k_seg[..., None, :])
  if window is not None:
    mask &= (q_pos[..., :, None] - k_pos[..., None, :]) < window
  return mask


def _masked_softmax(logits: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
  """softmax over the last axis of float32 logits [..., kv, g, tq, tk] where mask [..., tq, tk] admits keys."""
  # Every row admits at least its own key, so no row is fully masked (but the padding before a
  # shorter prompt in `generate`, whose outputs are discarded: finfo.min keeps them finite).
  logits = jnp.where(mask[..., None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _softmax_attend_grouped(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`_softmax_attend` contracting the grouped operands directly: the cached (decoding) path's form.

  Decoding keeps it: its chunks are short, so the layout gains nothing there, and with it the cached
  log-probabilities stay within 1e-5 of an uncached forward (the generate tests), as they were.
  """
  logits = jnp.einsum('...qhgd,...khd->...hgqk', q, k, preferred_element_type=jnp.float32)
  weights = _masked_softmax(logits * q.shape[-1]**-0.5, mask, v.dtype)
  return jnp.einsum('...hgqk,...khd->...qhgd', weights, v)


def _softmax_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [..., tq, kv, g, d], k/v [..., tk, kv, d], mask [..., tq, tk] -> [..., tq, kv, g, d].

  The two products run as plain batched matmuls, batch dimensions leading and each KV head's g query heads
  stacked as rows ([..., kv, g * tq, d] against [..., kv, tk, d]): on CPU this layout is 1.5x faster than
  contracting the grouped 5-d operands directly (the dot emitters then transpose around every product).
  """
  *lead, tq, kv, g, d = q.shape
  n = len(lead)
  tk = k.shape[-3]
  rows = jnp.moveaxis(q, (n + 1, n + 2), (n, n + 1)).reshape(*lead, kv, g * tq, d)  # [..., kv, g*tq, d]
  keys, values = jnp.moveaxis(k, n + 1, n), jnp.moveaxis(v, n + 1, n)             # [..., kv, tk, d]
  logits = jnp.einsum('...md,...kd->...mk', rows, keys, preferred_element_type=jnp.float32)
  weights = _masked_softmax(logits.reshape(*lead, kv, g, tq, tk) * d**-0.5, mask, v.dtype)
  out = jnp.einsum('...mk,...kd->...md', weights.reshape(*lead, kv, g * tq, tk), values)
  return jnp.moveaxis(out.reshape(*lead, kv, g, tq, d), n + 2, n)  # [..., tq, kv, g, d]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     positions: jax.Array, window: int | None) -> jax.Array:
  """Reference path with a dense [t, t] mask. q [b, t, kv, g, d], k/v [b, t, kv, d]."""
  idx = jnp.broadcast_to(jnp.arange(q.shape[1]), positions.shape)
  mask = attention_mask(idx, idx, positions, positions, segment_ids, segment_ids, window)
  return _softmax_attend(q, k, v, mask)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        positions: jax.Array, window: int, block_size: int, *,
                        index: jax.Array | None = None, context: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """Sliding-window attention whose cost is linear in length for a fixed window.

  Query block i only meets key blocks i - n + 1 .. i with n = ceil((W - 1) / B) + 1,
  the only ones that can intersect its window. Assumes positions grow at least as
  fast as the index within a segment (true for packed sequences restarting at 0),
  so an admitted key is fewer than W tokens back.

  A shard of a longer row (sequence parallelism): `index` [b, t] holds the tokens' indices in the whole row,
  and `context` the keys that precede the shard ({'k', 'v': [b, h, kv, d], 'segment_ids', 'positions',
  'index': [b, h]}, index -1 where there is none), which stand in for the dummy blocks on the left.
  """
  b, t = q.shape[:2]
  bs = min(block_size, t)
  nb = -(-t // bs)
  h = 0 if context is None else context['index'].shape[1]
  nk = min(-(-(window - 1) // bs) + 1, -(-h // bs) + nb)  # no more blocks than the context and shard hold
  pad = nb * bs - t  # right padding: padded keys follow every real query, so causality drops them
  left = (nk - 1) * bs  # left padding: dummy key blocks (index -1), after the context if any

  def blocks(x: jax.Array, fill: Any = 0) -> jax.Array:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=fill).reshape(b, nb, bs, *x.shape[2:])

  def key_windows(x: jax.Array, before: jax.Array | None, fill: Any = 0) -> jax.Array:
    if before is not None:
      x = jnp.concatenate([before.astype(x.dtype), x], axis=1)
    widths = [(0, 0), (left + t - x.shape[1], pad)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths, constant_values=fill).reshape(b, nb + nk - 1, bs, *x.shape[2:])
    return jnp.concatenate([x[:, j:j + nb] for j in range(nk)], axis=2)  # [b, nb, nk*bs, ...]

  ctx = context or {}
  idx = jnp.broadcast_to(jnp.arange(t), (b, t)) if index is None else index
  mask = attention_mask(blocks(idx), key_windows(idx, ctx.get('index'), -1), blocks(positions),
                        key_windows(positions, ctx.get('positions')), blocks(segment_ids),
                        key_windows(segment_ids, ctx.get('segment_ids')), window)
  out = _softmax_attend(blocks(q), key_windows(k, ctx.get('k')), key_windows(v, ctx.get('v')), mask)
  return out.reshape(b, nb * bs, *q.shape[2:])[:, :t]


def sequence_axis() -> str | None:
  """The mesh axis the token axis is split over: where the logical-axis rules in effect map 'length' to an
  axis of more than one device of the mesh in effect (jax.set_mesh); None otherwise (one device holds
  whole rows)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  try:
    spec = nn.logical_to_mesh_axes(('length',))
  except ValueError:  # no rule for 'length': replicated
    return None
  name = spec[0] if spec else None
  if isinstance(name, tuple):
    if len(name) != 1:
      raise ValueError(f"the token axis ('length') is mapped to several mesh axes {name}; map it to one.")
    name = name[0]
  if name is None or name not in mesh.axis_names or mesh.shape[name] == 1:
    return None
  return name


def halo(shard: Mapping[str, jax.Array], size: int, axis: str) -> dict[str, jax.Array]:
  """The `size` tokens before this device's shard of the row, gathered from the shards before it.

  Inside shard_map over `axis`, each device holds the next piece of every row ({'k', 'v', 'segment_ids',
  'positions'}, [b, L, ...]). Hop j moves the last min(L, size - (j - 1) L) tokens of each shard j devices
  on (one collective permute each), so a device receives exactly `size` tokens however long the row: the
  exchange grows with the window, not with the length. Returns those fields plus 'index', the tokens'
  indices in the row, -1 for the tokens before the row's start (the first shards have no predecessor).
  """
  n, s = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  b, length = shard['positions'].shape
  size = min(size, (n - 1) * length)  # nothing lies before the first shard
  pieces = []
  for j in range(1, -(-size // length) + 1):
    m = min(length, size - (j - 1) * length)
    perm = [(i, i + j) for i in range(n - j)]
    got = {name: jax.lax.ppermute(x[:, length - m:], axis, perm) for name, x in shard.items()}
    start = (s - j) * length + length - m
    got['index'] = jnp.broadcast_to(jnp.where(s >= j, start + jnp.arange(m), -1), (b, m))
    pieces.insert(0, got)  # hop j lies before hop j - 1
  if not pieces:
    return {**{name: x[:, :0] for name, x in shard.items()}, 'index': jnp.zeros((b, 0), jnp.int32)}
  return {name: jnp.concatenate([p[name] for p in pieces], axis=1) for name in pieces[0]}


def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                                positions: jax.Array, window: int, block_size: int, axis: str) -> jax.Array:
  """Sliding-window attention of rows split over mesh axis `axis`: each device attends its shard's queries to
  its own keys and the W - 1 keys before them (`halo`); otherwise as `blockwise_attention`.

  The other dimensions keep whatever sharding they have (batch over data, heads over tensor): only `axis` is
  manual here. Positions are the rows' own (global), so RoPE and the window need nothing else.
  """
  def local(q, k, v, segment_ids, positions):
    b, length = positions.shape
    index = jax.lax.axis_index(axis) * length + jnp.broadcast_to(jnp.arange(length), (b, length))
    shard = {'k': k, 'v': v, 'segment_ids': segment_ids, 'positions': positions}
    context = halo(shard, window - 1, axis)
    return blockwise_attention(q, k, v, segment_ids, positions, window, block_size, index=index,
                               context=context)

  spec = jax.sharding.PartitionSpec(None, axis)
  split = jax.shard_map(local, in_specs=(spec,) * 5, out_specs=spec, axis_names={axis}, check_vma=False)
  # Under jit also when called eagerly (an init outside a jitted step): jax's eager path of a shard_map manual
  # over some axes only rejects the others. Inside a jitted step this jit is inlined.
  return jax.jit(split)(q, k, v, segment_ids, positions)


def check_sequence_split(model_kwargs: Mapping[str, Any], length: int, shards: int) -> None:
  """ValueError (one line) unless rows of `length` tokens can be split over `shards` devices, each attending
  its own tokens and a halo of the window's keys from the shards before it (`sequence_parallel_attention`)."""
  window = model_kwargs.get('sliding_window')
  if window is None:
    raise ValueError(f'sequence={shards}: splitting rows needs a sliding window (model.sliding_window); with full '
                     'attention every shard needs every earlier key. Set a window or --config.mesh.sequence=1.')
  if length % shards:
    raise ValueError(f'the row length {length} is not divisible by the sequence axis ({shards} devices); use a '
                     f'length that is a multiple of {shards}, or another --config.mesh.sequence.')
  if window > length:
    raise ValueError(f'sliding_window={window} is larger than the whole row ({length} tokens): every token sees '
                     'its whole row and the halo would be the row itself; shrink the window or lengthen the rows.')


def _cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                      cache: Mapping[str, jax.Array],
                      window: int | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Attention of a chunk against a rolling-buffer cache plus itself, then the cache write.

  q [b, c, kv, g, d] and k/v [b, c, kv, d] are post-RoPE for positions [b, c]. The chunk
  attends to the S cached slots and to its own keys (causal, window aligned to each
  query's position); then its last min(S, c) keys/values go to slots `position % S`.
  """
  slots = cache['k'].shape[1]
  keys = jnp.concatenate([cache['k'], k.astype(cache['k'].dtype)], axis=1)
  values = jnp.concatenate([cache['v'], v.astype(cache['v'].dtype)], axis=1)
  k_pos = jnp.concatenate([cache['pos'], positions], axis=1)
  # Positions act as the causal index; empty slots (position -1) count as padding.
  mask = attention_mask(positions, k_pos, positions, k_pos, jnp.zeros_like(positions),
                        jnp.zeros_like(k_pos), window)
  out = _softmax_attend_grouped(q, keys.astype(q.dtype), values.astype(v.dtype), mask)
  n = min(slots, k.shape[1])
  write = jax.vmap(lambda buf, idx, upd: buf.at[idx].set(upd))
  idx = positions[:, -n:] % slots
  new = {'k': write(cache['k'], idx, k[:, -n:].astype(cache['k'].dtype)),
         'v': write(cache['v'], idx, v[:, -n:].astype(cache['v'].dtype))}
  return out, new


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', common.boxed(nn.initializers.ones, ('embed',)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Cast before the scale multiply, as HF and the reference do.
    return y.astype(self.dtype) * scale.astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Half-split (HF layout) rotary embedding of x [b, t, ..., d] at positions [b, t], in float32."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta**(jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (d,))
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., d // 2:], x32[..., :d // 2]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query attention; K/V stay at num_kv_heads (query heads grouped, never repeated)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  sliding_window: int | None
  rope_theta: float
  attention_impl: str
  block_size: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
               cache: Mapping[str, jax.Array] | None = None) -> Any:
    """Returns the output, or (output, {'k', 'v'} updated buffers) when `cache` is given.

    cache: {'k', 'v': [b, S, kv, d] post-RoPE, 'pos': [b, S] slot positions, -1 if empty}.
    """
    kv, d = self.num_kv_heads, self.head_dim
    proj = lambda heads, axis, name: _projection((heads, d), ('embed', axis, 'head_dim'), 1,
                                                 self.dtype, name=name)(x)
    q = checkpoint_name(proj(self.num_heads, 'heads', 'query'), 'query_proj')
    k = checkpoint_name(proj(kv, 'kv_heads', 'key'), 'key_proj')
    v = checkpoint_name(proj(kv, 'kv_heads', 'value'), 'value_proj')
    q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    # Query head h uses KV head h // group (HF repeat_kv order).
    q = q.reshape(*q.shape[:2], kv, self.num_heads // kv, d)
    new_cache = None
    axis = sequence_axis() if cache is None else None
    if cache is not None:
      out, new_cache = _cached_attention(q, k, v, positions, cache, self.sliding_window)
    elif axis is not None:
      if self.sliding_window is None:
        raise ValueError('sequence parallelism needs a sliding window (model.sliding_window): with full attention '
                         'every shard needs every earlier key; map the length axis to no mesh axis instead.')
      out = sequence_parallel_attention(q, k, v, segment_ids, positions, self.sliding_window, self.block_size,
                                        axis)
    elif self.attention_impl == 'blockwise' and self.sliding_window is not None:
      out = blockwise_attention(q, k, v, segment_ids, positions, self.sliding_window,
                                self.block_size)
    else:
      out = masked_attention(q, k, v, segment_ids, positions, self.sliding_window)
    out = out.reshape(*out.shape[:2], self.num_heads, d)
    out = _projection((x.shape[-1],), ('heads', 'head_dim', 'embed'), 2, self.dtype, name='out')(out)
    out = checkpoint_name(out, 'out_proj')
    return out if cache is None else (out, new_cache)


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, axes, name: _projection((n,), axes, 1, self.dtype, name=name)
    h = nn.silu(dense(self.mlp_dim, ('embed', 'mlp'), 'gate')(x))
    h = h * dense(self.mlp_dim, ('embed', 'mlp'), 'up')(x)
    return dense(x.shape[-1], ('mlp', 'embed'), 'down')(h)


class Block(nn.Module):
  """Pre-norm block; returns (x, None) so it can be used directly under nn.scan."""
  attn_kwargs: Mapping[str, Any]
  mlp_dim: int
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
               kv_cache: Mapping[str, jax.Array] | None = None,
               slot_pos: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Returns (x, None), or (x, updated {'k', 'v'}) when kv_cache/slot_pos are given."""
    y = RMSNorm(self.norm_eps, self.dtype, name='attn_norm')(x)
    attn = Attention(**self.attn_kwargs, dtype=self.dtype, name='attn')
    new_cache = None
    if kv_cache is None:
      y = attn(y, segment_ids, positions)
    else:
      y, new_cache = attn(y, segment_ids, positions, {**kv_cache, 'pos': slot_pos})
    x = x + y
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    y = RMSNorm(self.norm_eps, self.dtype, name='mlp_norm')(x)
    x = x + Mlp(self.mlp_dim, self.dtype, name='mlp')(y)
    return nn.with_logical_constraint(x, RESIDUAL_AXES), new_cache


class Model(nn.Module):
  """Mistral decoder: `__call__(tokens [b, t], segment_ids, positions)` -> f32 logits [b, t, vocab].

  sliding_window=None is full causal attention. attention_impl 'blockwise' (linear
  in length for a fixed window, query blocks of `block_size`) or 'masked' (dense
  [t, t] reference); both give the same outputs. remat: 'none', 'full' or
  'save_proj' (keeps the q/k/v/out projections). scan stacks layers under 'layers'.
  embed_noise_alpha > 0 turns on NEFTune (Jain et al. 2023) in training: uniform noise on the token
  embeddings, alpha / sqrt(L * d) at most, L per `embed_noise_length` (see `_embed_noise`).
  """
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  sliding_window: int | None
  vocab_size: int
  norm_eps: float
  rope_theta: float
  tie_embeddings: bool = False
  dtype: str = 'float32'
  scan: bool = False
  remat: str = 'none'
  attention_impl: str = 'blockwise'
  block_size: int = 128
  embed_noise_alpha: float = 0.0
  embed_noise_length: str = 'segment'

  def _check(self) -> None:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads {self.num_heads} not divisible by num_kv_heads '
                       f'{self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim must be even for RoPE, got {self.head_dim}')
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f'sliding_window must be >= 1 or None, got {self.sliding_window}')
    if self.attention_impl not in ('blockwise', 'masked'):
      raise ValueError(f"attention_impl must be 'blockwise' or 'masked', "
                       f'got {self.attention_impl!r}')
    if self.remat not in ('none', *REMAT_POLICIES):
      raise ValueError(f"remat must be 'none', 'full' or 'save_proj', got {self.remat!r}")
    if self.rope_theta is None or self.rope_theta <= 0:
      raise ValueError(f'rope_theta must be a positive number, got {self.rope_theta!r}')
    if self.embed_noise_alpha < 0:
      raise ValueError(f'embed_noise_alpha must be >= 0 (0 turns NEFTune off), got {self.embed_noise_alpha!r}')
    if self.embed_noise_length not in NOISE_LENGTHS:
      raise ValueError(f'embed_noise_length must be one of {NOISE_LENGTHS}, got {self.embed_noise_length!r}')

  def _embed_noise(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """NEFTune's noise U(-1, 1) * alpha / sqrt(L * d) for embeddings x [b, t, d] (float32).

    'segment' (the authors' form): L is the length of each token's own segment (its example, or its piece of
    a packed document), and padding (segment 0) gets none. 'padded' (transformers' and TRL's hook): L is the
    row length t, and every position gets noise, padding included.
    """
    b, t, d = x.shape
    noise = jax.random.uniform(self.make_rng('dropout'), x.shape, jnp.float32, -1.0, 1.0)
    if self.embed_noise_length == 'padded':
      return noise * (self.embed_noise_alpha / (t * d) ** 0.5)
    counts = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones_like(s), s, num_segments=t + 1))(segment_ids)
    lengths = jnp.take_along_axis(counts, segment_ids, axis=1).astype(jnp.float32)
    scale = jnp.where(segment_ids > 0, self.embed_noise_alpha / jnp.sqrt(jnp.maximum(lengths, 1.0) * d), 0.0)
    return noise * scale[..., None]

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: Cache | None = None, train: bool = False) -> Any:
    """Logits [b, t, vocab]; with `cache` (see `init_cache`), returns (logits, new cache).

    train=True adds NEFTune's embedding noise when embed_noise_alpha > 0 (drawn from the 'dropout' rng);
    evaluation and generation (train=False, the default) never do.
    """
    self._check()
    if cache is not None and segment_ids is not None:
      raise ValueError('segment_ids are not supported with a KV cache')
    dtype = jnp.dtype(self.dtype)
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    init = common.boxed(nn.initializers.normal(EMBED_STD), ('vocab', 'embed'))
    embedding = self.param('embedding', init, (self.vocab_size, self.embed_dim))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if train and self.embed_noise_alpha:
      x = (x.astype(jnp.float32) + self._embed_noise(x, segment_ids)).astype(dtype)
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)

    attn_kwargs = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       head_dim=self.head_dim, sliding_window=self.sliding_window,
                       rope_theta=self.rope_theta, attention_impl=self.attention_impl,
                       block_size=self.block_size)
    block_kwargs = dict(attn_kwargs=attn_kwargs, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps,
                        dtype=dtype)
    block_cls = Block
    if self.remat != 'none':
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan, policy=REMAT_POLICIES[self.remat])
    new_cache = None
    if self.scan and cache is None:
      stack = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**block_kwargs, name='layers')(x, segment_ids, positions)
    elif self.scan:  # the cache's leading layer axis is scanned alongside the params
      stack = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                      length=self.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      kv = {'k': cache['k'], 'v': cache['v']}
      x, new_cache = stack(**block_kwargs, name='layers')(x, segment_ids, positions, kv,
                                                          cache['pos'])
    else:
      layer_caches = []
      for i in range(self.num_layers):
        block = block_cls(**block_kwargs, name=f'layer_{i}')
        if cache is None:
          x, _ = block(x, segment_ids, positions)
        else:
          x, c = block(x, segment_ids, positions, {'k': cache['k'][i], 'v': cache['v'][i]},
                       cache['pos'])
          layer_caches.append(c)
      if cache is not None:
        new_cache = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_caches)
    x = RMSNorm(self.norm_eps, dtype, name='final_norm')(x)

    if self.tie_embeddings:
      logits = jnp.einsum('bte,ve->btv', x, embedding.astype(dtype))
    else:
      logits = _projection((self.vocab_size,), ('embed', 'vocab'), 1, dtype, name='head')(x)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    n = min(cache['pos'].shape[1], t)
    write = jax.vmap(lambda buf, idx, upd: buf.at[idx].set(upd))
    slot_pos = write(cache['pos'], positions[:, -n:] % cache['pos'].shape[1], positions[:, -n:])
    return logits, {**new_cache, 'pos': slot_pos}

  def decode(self, tokens: jax.Array, positions: jax.Array,
             cache: Cache) -> tuple[jax.Array, Cache]:
    """Cached forward of a chunk: tokens/positions [b, c] -> (f32 logits [b, c, vocab], cache).

    Use via `model.apply({'params': p}, tokens, positions, cache, method='decode')`.
    The chunk must directly follow the cached positions (no gaps, no segment_ids).
    """
    return self(tokens, positions=positions, cache=cache)


def init_cache(model: Model, batch: int, length: int) -> Cache:
  """Empty rolling-buffer KV cache for `model` and sequences of up to `length` tokens.

  S = model.sliding_window slots (length slots when sliding_window is None):
  'k', 'v': [num_layers, batch, S, num_kv_heads, head_dim] in model.dtype, keys post-RoPE;
  'pos': int32 [batch, S], the absolute position held by each slot (-1 = empty).
  Position p lives in slot p % S, so the size never grows past S.
  """
  slots = length if model.sliding_window is None else model.sliding_window
  shape = (model.num_layers, batch, slots, model.num_kv_heads, model.head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(model.dtype))
  return {'k': zeros, 'v': zeros, 'pos': jnp.full((batch, slots), -1, jnp.int32)}


def _attention_pairs(model: Model, length: int, attention: str) -> int:
  """(query, key) pairs per head and layer: as computed by the configured implementation, or causal."""
  window = model.sliding_window or length
  if attention == 'causal':  # min(i + 1, W) keys for query i
    inside = min(window, length)
    return inside * (inside + 1) // 2 + (length - inside) * window
  if attention != 'computed':
    raise ValueError(f"attention must be 'computed' or 'causal', got {attention!r}")
  if model.attention_impl == 'blockwise' and model.sliding_window is not None:
    block = min(model.block_size, length)  # as blockwise_attention tiles it, padding included
    query_blocks = -(-length // block)
    key_blocks = min(-(-(window - 1) // block) + 1, query_blocks)
    return query_blocks * block * key_blocks * block
  return length * length


def forward_flops(model_kwargs: Mapping[str, Any], input_shape: tuple[int, ...], *,
                  attention: str = 'computed') -> float:
  """Forward FLOPs of one (L,) token row: 2 x the MACs of the q/k/v/out projections (GQA sizes), attention
  scores and weighted sum, the SwiGLU MLP and the LM head; the embedding lookup, norms, RoPE and softmax
  are left out.

  attention='computed' counts the attention the configured implementation evaluates (masked: all L x L
  pairs; blockwise: the key tiles each query block meets); 'causal' only the useful pairs, min(i + 1, W)
  keys for query i (the MaxText convention).
  """
  model = Model(**model_kwargs)
  model._check()
  (length,) = input_shape
  e, heads, kv, d = model.embed_dim, model.num_heads, model.num_kv_heads, model.head_dim
  per_token = e * d * (2 * heads + 2 * kv) + 3 * e * model.mlp_dim  # q, out, k, v; gate, up, down
  per_layer = length * per_token + 2 * _attention_pairs(model, length, attention) * heads * d
  return 2.0 * (model.num_layers * per_layer + length * e * model.vocab_size)


def param_count(model_kwargs: Mapping[str, Any]) -> int:
  """Number of parameters, computed abstractly with jax.eval_shape (no memory)."""
  return common.count_params(Model(**model_kwargs), (1, 1), jnp.int32)


def __getattr__(name: str) -> Any:
  # Generation lives in models/mistral_decode.py; its public names stay reachable here (no import cycle).
  if name in ('generate', 'sample_logits'):
    from models import mistral_decode
    return getattr(mistral_decode, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
