"""Sequence parallelism of the Mistral decoder: rows split over a 'sequence' mesh axis, each shard attending its
own keys and a halo of the window's keys from the shards before it, equal to the whole row on one device."""
import re

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from models import mistral

RULES = (('batch', 'data'), ('length', 'sequence'), ('act_embed', None), ('embed', 'fsdp'), ('heads', 'tensor'),
         ('kv_heads', 'tensor'), ('mlp', 'tensor'), ('vocab', 'tensor'), ('head_dim', None), ('layers', None))


def _model(window, block_size=8, **kw):
  return mistral.Model(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                       sliding_window=window, vocab_size=50, norm_eps=1e-5, rope_theta=10_000.0,
                       block_size=block_size, **kw)


def _rows(length, packed):
  """Two rows of tokens, segment ids and positions; packed: documents that cross the shard boundaries (16
  tokens each at sequence=4) and padding at the end of the second row."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, length))
  segments = np.ones((2, length), np.int32)
  positions = np.tile(np.arange(length), (2, 1))
  if packed:
    for i, cut in enumerate((5, 23, 40)):  # documents [0, 5), [5, 23), [23, 40), [40, 64)
      segments[:, cut:] = i + 2
      positions[:, cut:] = np.arange(length - cut)
    segments[1, -3:] = 0
    positions[1, -3:] = 0
  return tuple(map(jnp.asarray, (tokens, segments, positions)))


def _loss(model):
  def loss(params, tokens, segments, positions):
    logits = model.apply({'params': params}, tokens, segments, positions)
    weights = (segments[:, 1:] > 0).astype(jnp.float32)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    return -(picked * weights).sum() / weights.sum(), logits
  return jax.value_and_grad(loss, has_aux=True)


def _split(model, params, rows, data, sequence, fsdp=1, tensor=1):
  """(loss, logits), grads of `rows` on a data x fsdp x sequence x tensor mesh of the first devices (the
  parameters sharded by their logical axes), and the compiled program's text."""
  sizes = (data, fsdp, sequence, tensor)
  mesh = jax.make_mesh(sizes, ('data', 'fsdp', 'sequence', 'tensor'), axis_types=(AxisType.Auto,) * 4,
                       devices=jax.devices()[:int(np.prod(sizes))])
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    placed = [jax.device_put(x, NamedSharding(mesh, P('data', 'sequence'))) for x in rows]
    boxed = model.init({'params': jax.random.key(0)}, rows[0])['params']
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
    params = jax.device_put(params, shardings)
    step = jax.jit(_loss(model))
    return step(params, *placed), step.lower(params, *placed).compile().as_text()


def _relative(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('window, packed, mesh, scan', [
    (8, False, dict(sequence=4), False),          # the window within one shard of 16 tokens
    (24, False, dict(sequence=4), False),         # spanning two shards: two hops
    (40, True, dict(sequence=4), True),           # three hops, documents across the boundaries, scan + remat
    (24, True, dict(data=2, sequence=2), False),  # data=2 x sequence=2
    (24, True, dict(fsdp=2, sequence=2, tensor=2), True),  # with FSDP and tensor-parallel heads
    (64, False, dict(sequence=4), False),         # the window as long as the row: the first shard reaches the last
])
def test_split_rows_equal_the_whole_row(window, packed, mesh, scan):
  model = _model(window, scan=scan, remat='full' if scan else 'none')
  rows = _rows(64, packed)
  params = nn.unbox(model.init({'params': jax.random.key(0)}, rows[0])['params'])
  (loss, logits), grads = jax.jit(_loss(model))(params, *rows)
  ((split_loss, split_logits), split_grads), _ = _split(model, params, rows, mesh.get('data', 1),
                                                        mesh['sequence'], mesh.get('fsdp', 1), mesh.get('tensor', 1))
  assert _relative(split_logits, logits) < 1e-5
  assert abs(float(split_loss - loss)) < 1e-5 * abs(float(loss))
  for name, (a, b) in zip(jax.tree_util.tree_leaves_with_path(split_grads), zip(jax.tree.leaves(split_grads),
                                                                              jax.tree.leaves(grads))):
    assert _relative(a, b) < 1e-5, name[0]


def _permuted_tokens(hlo_text):
  """Tokens moved by each collective permute of a compiled program ([b, m, kv, d] keys or values: m)."""
  shapes = re.findall(r'= f32\[(\d+),(\d+),2,8\]\{[^}]*\} collective-permute', hlo_text)
  return sorted(int(m) for _, m in shapes)


def test_halo_moves_the_window_not_the_row():
  """Per layer and device, the keys and values received are W - 1 tokens (at 64 tokens in two hops of 16 and
  7, at 256 in one of 23), whatever the row length: the programs at 64 and 256 tokens permute the same total."""
  model = _model(24)
  moved = {}
  for length in (64, 256):
    rows = _rows(length, packed=False)
    params = nn.unbox(model.init({'params': jax.random.key(0)}, rows[0])['params'])
    _, text = _split(model, params, rows, 1, 4)
    moved[length] = _permuted_tokens(text)
    # No activations of the whole row are gathered (the int token ids of the loss's shifted labels may be).
    gathered = re.findall(r'= (\w+)\[([\d,]*)\][^=]* all-gather\(', text)
    assert not [shape for dtype, shape in gathered if dtype.startswith(('f', 'bf')) and str(length) in shape.split(',')]
  shard = 64 // 4
  assert moved[64] and sum(moved[64]) == sum(moved[256])
  # Forward and backward, two layers, keys and values: each hop's share of the W - 1 = 23 halo tokens.
  assert set(moved[64]) == {shard, 23 - shard}
  assert set(moved[256]) == {23}


def test_bad_splits_are_one_line():
  kwargs = {'sliding_window': 8}
  with pytest.raises(ValueError, match=r'^the row length 30 is not divisible by the sequence axis \(4 devices\)'):
    mistral.check_sequence_split(kwargs, 30, 4)
  with pytest.raises(ValueError, match=r'^sliding_window=64 is larger than the whole row \(32 tokens\)'):
    mistral.check_sequence_split({'sliding_window': 64}, 32, 4)
  with pytest.raises(ValueError, match='needs a sliding window'):
    mistral.check_sequence_split({'sliding_window': None}, 32, 4)
  mistral.check_sequence_split(kwargs, 32, 4)
