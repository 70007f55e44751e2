"""Tests for models/mistral.py: HF equivalence, window, packing, scan/remat, converters."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import mistral, mistral_weights

P = jax.sharding.PartitionSpec

HF_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, vocab_size=97, sliding_window=5,
              rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
KWARGS = dict(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
              sliding_window=5, vocab_size=97, norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  config = transformers.MistralConfig(**HF_CFG, attn_implementation='eager')
  model = transformers.MistralForCausalLM(config).float().eval()
  with torch.no_grad():
    for p in model.parameters():  # random norms too, and larger weights than the default init
      p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
  return model


@pytest.fixture(scope='module')
def converted(hf_model):
  sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
  return mistral_weights.from_hf(hf_model.config.to_dict(), sd)


def _tokens(b: int, t: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, KWARGS['vocab_size'], (b, t)).astype(np.int32)


def _apply(model: mistral.Model, params: dict, *args) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({'params': params}, *args))


def _init(seed: int = 0, **overrides) -> dict:
  model = mistral.Model(**{**KWARGS, **overrides})
  variables = model.init({'params': jax.random.key(seed)}, jnp.zeros((1, 4), jnp.int32))
  return nn.meta.unbox(variables['params'])


@pytest.mark.parametrize('impl,block_size', [('masked', 128), ('blockwise', 4), ('blockwise', 8)])
def test_matches_hf(hf_model, converted, impl, block_size):
  kwargs, params = converted
  assert kwargs == {**KWARGS, 'tie_embeddings': False}
  tokens = _tokens(2, 19)
  with torch.no_grad():
    want = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
  model = mistral.Model(**kwargs, attention_impl=impl, block_size=block_size)
  got = _apply(model, params, tokens)
  assert got.dtype == np.float32 and got.shape == (2, 19, 97)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_full_causal_matches_hf(hf_model, converted):
  kwargs, params = converted
  config = transformers.MistralConfig(**{**HF_CFG, 'sliding_window': None},
                                      attn_implementation='eager')
  full = transformers.MistralForCausalLM(config).float().eval()
  full.load_state_dict(hf_model.state_dict())
  tokens = _tokens(2, 12, seed=1)
  with torch.no_grad():
    want = full(torch.from_numpy(tokens).long()).logits.numpy()
  for impl in ('masked', 'blockwise'):
    model = mistral.Model(**{**kwargs, 'sliding_window': None}, attention_impl=impl)
    np.testing.assert_allclose(_apply(model, params, tokens), want,
                               atol=1e-5, rtol=0)


def _weights(impl: str, t: int, window: int, block_size: int = 3) -> np.ndarray:
  """Attention probabilities [t(q), t(k)] read out through one-hot values."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, t, 1, 1, t)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, t, 1, t)), jnp.float32)
  v = jnp.eye(t, dtype=jnp.float32)[None, :, None, :]  # value of key j is e_j
  seg, pos = jnp.ones((1, t), jnp.int32), jnp.arange(t)[None]
  if impl == 'masked':
    out = mistral.masked_attention(q, k, v, seg, pos, window)
  else:
    out = mistral.blockwise_attention(q, k, v, seg, pos, window, block_size)
  return np.asarray(out[0, :, 0, 0, :])


@pytest.mark.parametrize('impl', ['masked', 'blockwise'])
def test_window_admits_exactly_w_keys(impl):
  t, w = 16, 4
  weights = _weights(impl, t, w)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  expected = (j <= i) & (j > i - w)  # direct construction: W keys including the query itself
  np.testing.assert_array_equal(weights > 0, expected)
  np.testing.assert_array_equal((weights > 0).sum(1), np.minimum(np.arange(t) + 1, w))
  rows = np.arange(w, t)
  assert np.all(weights[rows, rows - w] == 0) and np.all(weights[rows, rows - w + 1] > 0)
  np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize('t,w,bs', [(19, 5, 4), (23, 5, 8), (7, 3, 16), (21, 1, 4), (30, 11, 4)])
def test_blockwise_equals_masked(t, w, bs):
  rng = np.random.default_rng(t)
  q = jnp.asarray(rng.normal(size=(2, t, 2, 3, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, t)), axis=1), jnp.int32)
  pos = jnp.asarray(np.stack([_segment_positions(s) for s in np.asarray(seg)]))
  for s, p in ((jnp.ones((2, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (2, t))), (seg, pos)):
    want = jax.jit(mistral.masked_attention, static_argnums=5)(q, k, v, s, p, w)
    got = jax.jit(mistral.blockwise_attention, static_argnums=(5, 6))(q, k, v, s, p, w, bs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def _segment_positions(seg: np.ndarray) -> np.ndarray:
  starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
  pos = np.arange(len(seg))
  return (pos - starts[np.searchsorted(starts, pos, side='right') - 1]).astype(np.int32)


def test_packed_equals_separate(converted):
  kwargs, params = converted
  lengths = (7, 9, 4)  # segments longer and shorter than the window; 4 padding tokens at the end
  seqs = [_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
  pad = 4
  tokens = np.concatenate(seqs + [np.zeros(pad, np.int32)])[None]
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
  seg = seg.astype(np.int32)[None]
  pos = _segment_positions(seg[0])[None]
  outs = {}
  for impl in ('masked', 'blockwise'):
    model = mistral.Model(**kwargs, attention_impl=impl, block_size=4)
    outs[impl] = _apply(model, params, tokens, seg, pos)
    start = 0
    for s in seqs:
      alone = _apply(model, params, s[None])
      np.testing.assert_allclose(outs[impl][:, start:start + len(s)], alone, atol=1e-5, rtol=0)
      start += len(s)
  np.testing.assert_allclose(outs['blockwise'], outs['masked'], atol=1e-5, rtol=0)


def test_scan_equals_unrolled_and_remat(converted):
  kwargs, params = converted
  tokens = _tokens(2, 13, seed=3)
  want = _apply(mistral.Model(**kwargs), params, tokens)
  stacked = mistral_weights.stack_layers(params)
  scan_init = _init(scan=True)
  assert jax.tree.map(np.shape, scan_init) == jax.tree.map(np.shape, stacked)
  loss = lambda m, p: jnp.sum(m.apply({'params': p}, tokens)**2) * 1e-3
  grad_ref = jax.jit(jax.grad(lambda p: loss(mistral.Model(**kwargs), p)))(params)
  for scan in (False, True):
    for remat in ('none', 'full', 'save_proj'):
      model = mistral.Model(**kwargs, scan=scan, remat=remat)
      p = stacked if scan else params
      np.testing.assert_allclose(_apply(model, p, tokens), want,
                                 atol=1e-5, rtol=0)
      if (scan, remat) in ((False, 'save_proj'), (True, 'full')):  # grads compile slowly on CPU
        g = jax.jit(jax.grad(lambda p: loss(model, p)))(p)
        g = mistral_weights.unstack_layers(g) if scan else g
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                     g, grad_ref)


def test_logical_axes_and_gqa_shapes():
  for scan in (False, True):
    model = mistral.Model(**KWARGS, scan=scan)
    boxed = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                              jnp.zeros((1, 4), jnp.int32)))['params']
    names = nn.get_partition_spec(boxed)
    layer = names['layers'] if scan else names['layer_0']
    pre = ('layers',) if scan else ()
    assert names['embedding'] == P('vocab', 'embed')
    assert names['head']['kernel'] == P('embed', 'vocab')
    assert layer['attn']['query']['kernel'] == P(*pre, 'embed', 'heads', 'head_dim')
    assert layer['attn']['key']['kernel'] == P(*pre, 'embed', 'kv_heads', 'head_dim')
    assert layer['attn']['out']['kernel'] == P(*pre, 'heads', 'head_dim', 'embed')
    assert layer['mlp']['down']['kernel'] == P(*pre, 'mlp', 'embed')
    assert layer['attn_norm']['scale'] == P(*pre, 'embed')
    is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
    assert all(is_boxed(x) for x in jax.tree.leaves(boxed, is_leaf=is_boxed))
  shapes = jax.tree.map(np.shape, _init())
  attn = shapes['layer_0']['attn']
  assert attn['query']['kernel'] == (64, 4, 16)
  assert attn['key']['kernel'] == attn['value']['kernel'] == (64, 2, 16)
  assert attn['out']['kernel'] == (4, 16, 64)


def test_sharded_run_matches_unsharded(converted):
  """Under a mesh with logical rules (tensor parallel over heads/kv_heads/mlp) outputs match."""
  kwargs, params = converted
  model = mistral.Model(**kwargs, scan=True)
  params = mistral_weights.stack_layers(params)
  tokens = _tokens(2, 9)
  want = _apply(model, params, tokens)
  mesh = jax.make_mesh((2, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  rules = (('batch', 'data'), ('heads', 'model'), ('kv_heads', 'model'), ('mlp', 'model'),
           ('vocab', None), ('embed', None), ('head_dim', None), ('layers', None),
           ('act_embed', None), ('length', None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, tokens))['params']
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    got = jax.jit(lambda p, x: model.apply({'params': p}, x))(sharded, tokens)
  key_spec = sharded['layers']['attn']['key']['kernel'].sharding.spec
  assert key_spec == jax.P(None, None, 'model', None)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_tied_embeddings_round_trip():
  params = _init(tie_embeddings=True)
  assert 'head' not in params
  kwargs = {**KWARGS, 'tie_embeddings': True}
  cfg, sd = mistral_weights.to_hf(kwargs, params)
  assert 'lm_head.weight' not in sd
  kw2, p2 = mistral_weights.from_hf(cfg, sd)
  assert kw2 == kwargs
  jax.tree.map(np.testing.assert_array_equal, p2, jax.tree.map(np.asarray, params))


def test_round_trip(hf_model, converted):
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  cfg = hf_model.config.to_dict()
  kwargs, params = converted
  cfg2, sd2 = mistral_weights.to_hf(kwargs, params)
  assert sd2.keys() == sd.keys()
  for name in sd:
    assert sd2[name].shape == sd[name].shape and np.array_equal(sd2[name], sd[name]), name
  for key, value in cfg2.items():
    if key != 'architectures':
      assert cfg[key] == value, key
  # Scanned params convert too, and the HF config dict loads.
  cfg3, sd3 = mistral_weights.to_hf(kwargs, mistral_weights.stack_layers(params))
  assert all(np.array_equal(sd3[n], sd[n]) for n in sd)
  assert transformers.MistralConfig(**cfg3).rope_parameters['rope_theta'] == 10000.0
  kw4, p4 = mistral_weights.from_hf(cfg2, sd2)
  assert kw4 == kwargs
  jax.tree.map(np.testing.assert_array_equal, p4, params)


def test_param_count_mistral_7b():
  kwargs = dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                mlp_dim=14336, sliding_window=4096, vocab_size=32000, norm_eps=1e-5,
                rope_theta=10000.0, tie_embeddings=False, scan=True)
  assert mistral.param_count(kwargs) == 7_241_732_096


def test_missing_rope_theta_raises():
  cfg = {k: v for k, v in HF_CFG.items() if k != 'rope_theta'}
  with pytest.raises(ValueError, match='rope_theta') as err:
    mistral_weights.from_hf(cfg, {})
  assert '\n' not in str(err.value)
  with pytest.raises(TypeError, match='rope_theta'):
    mistral.Model(**{k: v for k, v in KWARGS.items() if k != 'rope_theta'})
  with pytest.raises(ValueError, match='rope_theta'):
    model = mistral.Model(**{**KWARGS, 'rope_theta': None})
    model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_blockwise_cost_is_linear():
  """No blockwise intermediate is quadratic in length: tiles outside the window are never built."""
  t, w, bs = 2048, 16, 16
  q = jax.ShapeDtypeStruct((1, t, 1, 1, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  sizes = lambda fn: [math.prod(v.aval.shape) for e in jax.make_jaxpr(fn)(q, kv, kv, ids, ids).eqns
                      for v in e.outvars]
  block = max(sizes(lambda *a: mistral.blockwise_attention(*a, w, bs)))
  assert block <= t * 2 * bs * 2  # [t, (ceil((w-1)/bs)+1) * bs] logits, a few times over at most
  assert max(sizes(lambda *a: mistral.masked_attention(*a, w))) >= t * t


def test_documented_permutation_turns_adjacent_pair_rope_into_half_split(original_state_dict):
  """Complex (adjacent-pair) RoPE on original rows == half-split RoPE on HF rows, for every position pair."""
  rng = np.random.default_rng(0)
  d, e, theta = 8, 12, 10000.0
  hf_wq, hf_wk = rng.standard_normal((d, e)), rng.standard_normal((d, e))
  sd = original_state_dict({'model.layers.0.self_attn.q_proj.weight': hf_wq,
                             'model.layers.0.self_attn.k_proj.weight': hf_wk}, d)
  wq, wk = sd['layers.0.attention.wq.weight'], sd['layers.0.attention.wk.weight']
  x, y = rng.standard_normal(e), rng.standard_normal(e)
  freqs = theta ** -(np.arange(0, d, 2) / d)

  def complex_rope(v, pos):
    return (v[0::2] + 1j * v[1::2]) * np.exp(1j * pos * freqs)

  def half_split_rope(v, pos):
    cos, sin = np.cos(pos * np.concatenate([freqs, freqs])), np.sin(pos * np.concatenate([freqs, freqs]))
    return v * cos + np.concatenate([-v[d // 2:], v[:d // 2]]) * sin

  for pq, pk in [(0, 0), (5, 2), (17, 3)]:
    original = np.real(np.vdot(complex_rope(wk @ y, pk), complex_rope(wq @ x, pq)))
    hf = half_split_rope(hf_wq @ x, pq) @ half_split_rope(hf_wk @ y, pk)
    np.testing.assert_allclose(original, hf, rtol=1e-10)


def test_original_format_import_equals_hf_import(hf_model, converted, original_state_dict):
  kwargs, params = converted
  hf_sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  original = original_state_dict(hf_sd, HF_CFG['head_dim'])
  params_json = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                     norm_eps=1e-5, sliding_window=5, vocab_size=97)
  with pytest.raises(ValueError, match='no rope_theta'):
    mistral_weights.from_original(params_json, original)
  kw2, p2 = mistral_weights.from_original(params_json, original, rope_theta=10000.0)
  assert kw2 == kwargs
  jax.tree.map(np.testing.assert_array_equal, p2, params)
  # Without the permutation the model would differ: the rows really moved.
  assert not np.array_equal(original['layers.0.attention.wq.weight'],
                            hf_sd['model.layers.0.self_attn.q_proj.weight'])


def test_gqa_equals_multi_head_with_repeated_kv(converted):
  """4 query heads over 2 K/V heads == 4 heads each with its own copy of K/V head h // 2 (HF repeat_kv)."""
  kwargs, params = converted
  group = KWARGS['num_heads'] // KWARGS['num_kv_heads']
  mha = jax.tree.map(np.asarray, params)
  for i in range(KWARGS['num_layers']):
    for name in ('key', 'value'):
      kernel = mha[f'layer_{i}']['attn'][name]['kernel']  # [embed, kv_heads, head_dim]
      mha[f'layer_{i}']['attn'][name]['kernel'] = np.repeat(kernel, group, axis=1)
  tokens = _tokens(2, 13)
  want = _apply(mistral.Model(**kwargs, attention_impl='masked'), params, tokens)
  got = _apply(mistral.Model(**{**kwargs, 'num_kv_heads': KWARGS['num_heads']}, attention_impl='masked'),
               mha, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
