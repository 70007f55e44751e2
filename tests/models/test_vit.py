"""Tests for models/vit.py and vit_weights.py: shapes, parameter counts, timm/HF equivalence, knobs."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers

from models import common, vit, vit_weights

ATOL = 1e-5
LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'head_dim', 'classes', 'layers', None}
TINY = dict(num_classes=7, width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8)


def _init(model: vit.Model, hw=(32, 32), boxed=False):
  """Real (jitted) init; slow-ish on CPU, so most tests use _random_params instead."""
  variables = jax.jit(model.init)({'params': jax.random.key(0)}, jnp.zeros((1, *hw, 3)))
  return variables['params'] if boxed else nn.meta.unbox(variables['params'])


def _abstract(model: vit.Model, hw=(32, 32), boxed=False):
  """Boxed ShapeDtypeStructs of the params, without computing anything."""
  params = jax.eval_shape(model.init, {'params': jax.random.key(0)}, jnp.zeros((1, *hw, 3)))
  return params['params'] if boxed else nn.meta.unbox(params['params'])


def _random_params(model: vit.Model, hw=(32, 32), seed=0):
  """Random non-trivial values for the params tree (much faster than init on CPU)."""
  rng = np.random.RandomState(seed)

  def fill(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == 'scale' else 0.1 * noise

  return jax.tree_util.tree_map_with_path(fill, _abstract(model, hw))


_JITTED = {}


def _apply(model: vit.Model, params, images, **kwargs):
  """Jitted apply, one compile per model config: much faster on CPU than op-by-op dispatch."""
  fn = _JITTED.setdefault(repr(model), jax.jit(model.apply, static_argnames='train'))
  return fn({'params': params}, images, **kwargs)


def _images(hw, batch=2, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).normal(size=(batch, *hw, 3)).astype(np.float32)


def _randomize_torch(model: torch.nn.Module, seed: int) -> None:
  """Non-trivial values everywhere (biases, norms, tokens) so no mapping error can hide."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith('bias'):
        p.copy_(0.1 * noise)
      elif p.ndim == 1:  # LayerNorm scale
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 3:  # class token / position embedding
        p.copy_(0.5 * noise)
      else:  # Linear (out, in) / Conv (out, in, kh, kw): unit-variance outputs
        p.copy_(noise / math.sqrt(p[0].numel()))


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return getattr(out, 'logits', out).numpy()


def _assert_tree_matches_init(kwargs, params, hw):
  expected = _abstract(vit.Model(**kwargs), hw)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == np.float32 == want.dtype


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize('variant,count', [('Ti/16', 5_717_416), ('S/16', 22_050_664),
                                           ('B/16', 86_567_656), ('L/16', 304_326_632)])
def test_param_count_exact(variant, count):
  assert vit.param_count(dict(variant=variant, num_classes=1000)) == count


@pytest.mark.parametrize('name', list(vit.VARIANTS))
def test_every_variant_shapes(name):
  width, depth, mlp, heads = vit.VARIANTS[name]
  kwargs = dict(variant=f'{name}/14', num_classes=1000, scan=True)
  params = _abstract(vit.Model(**kwargs), (224, 224))
  blocks = params['encoder']['blocks']
  assert params['embedding']['kernel'].shape == (14, 14, 3, width)
  assert params['pos_embedding'].shape == (1, 1 + 16 * 16, width)
  assert blocks['attn']['query']['kernel'].shape == (depth, width, heads, width // heads)
  assert blocks['mlp']['fc1']['kernel'].shape == (depth, width, mlp)
  assert params['head']['kernel'].shape == (width, 1000)
  per_block = 4 * width + 4 * width * width + 4 * width + 2 * width * mlp + mlp + width
  expected = (14 * 14 * 3 * width + width + width + 257 * width + depth * per_block
              + 2 * width + width * 1000 + 1000)
  assert vit.param_count(kwargs) == expected


def test_overrides_and_unknown_variant():
  assert vit.Model(variant='B/16', depth=3, patch_size=(8, 4)).dims() == dict(
      width=768, depth=3, mlp_dim=3072, num_heads=12, patch_size=(8, 4))
  with pytest.raises(ValueError) as err:
    vit.Model(variant='X/16').dims()
  msg = str(err.value)
  assert '\n' not in msg and "'X/16'" in msg
  assert all(name in msg for name in vit.VARIANTS)
  with pytest.raises(ValueError, match='width'):
    vit.Model(depth=2).dims()


# ---------------------------------------------------------------- timm


@pytest.fixture(scope='module', params=[(224, 224), (160, 224)], ids=['224x224', '160x224'])
def timm_case(request):
  hw = request.param
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=hw).eval()
  _randomize_torch(model, seed=hw[0])
  images = _images(hw)
  return hw, _numpy_state(model), images, _torch_logits(model, images)


def test_timm_logits_match(timm_case):
  hw, state, images, want = timm_case
  kwargs, params = vit_weights.from_timm(state, num_heads=3, grid_hw=(hw[0] // 16, hw[1] // 16))
  assert kwargs['width'] == 192 and kwargs['depth'] == 12 and kwargs['num_classes'] == 1000
  got = _apply(vit.Model(**kwargs), params, images)
  assert got.dtype == jnp.float32 and np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize('scan', [False, True])
def test_timm_params_match_init_tree(timm_case, scan):
  hw, state, _, _ = timm_case
  kwargs, params = vit_weights.from_timm(state, num_heads=3, grid_hw=(hw[0] // 16, hw[1] // 16), scan=scan)
  assert kwargs['scan'] == scan
  _assert_tree_matches_init(kwargs, params, hw)


def test_scan_and_remat_match_unrolled(timm_case):
  hw, state, images, want = timm_case
  kwargs, params = vit_weights.from_timm(state, num_heads=3, grid_hw=(hw[0] // 16, hw[1] // 16))
  stacked = vit.stack_layers(params)
  jax.tree.map(np.testing.assert_array_equal, vit.unstack_layers(stacked), params)
  for scan, remat in [(True, False), (True, True), (False, True)]:
    model = vit.Model(**{**kwargs, 'scan': scan, 'remat': remat})
    got = _apply(model, stacked if scan else params, images)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_converters_reachable_from_model_module():
  assert vit.from_timm is vit_weights.from_timm and vit.from_hf is vit_weights.from_hf
  with pytest.raises(AttributeError):
    vit.no_such_name


def test_timm_rejects_unknown_layout(timm_case):
  hw, state, _, _ = timm_case
  with pytest.raises(ValueError, match='fc_norm.weight'):
    vit_weights.from_timm({**state, 'fc_norm.weight': np.ones(192, np.float32)}, num_heads=3,
                  grid_hw=(hw[0] // 16, hw[1] // 16))


# ---------------------------------------------------------------- HF


@pytest.fixture(scope='module', params=['224x224', '160x224'])
def hf_case(request):
  extra = {} if request.param == '224x224' else dict(
      image_size=(160, 224), hidden_act='gelu_pytorch_tanh', qkv_bias=False)
  config = transformers.ViTConfig(
      hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
      patch_size=16, num_labels=10, attn_implementation='eager', **extra)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(config).eval()
  _randomize_torch(model, seed=1)
  hw = (224, 224) if request.param == '224x224' else (160, 224)
  images = _images(hw, seed=1)
  return config.to_dict(), _numpy_state(model), images, _torch_logits(model, images)


def test_hf_logits_match(hf_case):
  config, state, images, want = hf_case
  kwargs, params = vit_weights.from_hf(config, state)
  assert kwargs['layernorm_epsilon'] == 1e-12
  assert kwargs['gelu_approximate'] == (config['hidden_act'] != 'gelu')
  assert kwargs['qkv_bias'] == config['qkv_bias']
  got = _apply(vit.Model(**kwargs), params, images)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize('scan', [False, True])
def test_hf_params_match_init_tree(hf_case, scan):
  config, state, images, want = hf_case
  kwargs, params = vit_weights.from_hf(config, state, scan=scan)
  _assert_tree_matches_init(kwargs, params, images.shape[1:3])
  if scan:
    np.testing.assert_allclose(_apply(vit.Model(**kwargs), params, images), want,
                               atol=ATOL, rtol=0)


def test_hf_vitmodel_drops_pooler(hf_case):
  config, state, images, _ = hf_case
  base = {k: v for k, v in state.items() if not k.startswith('classifier.')}
  base['vit.pooler.dense.weight'] = np.zeros((192, 192), np.float32)
  kwargs, params = vit_weights.from_hf(config, base)
  assert kwargs['num_classes'] == 0 and 'head' not in params
  assert _apply(vit.Model(**kwargs), params, images).shape == (2, 192)


def test_posemb_grid_errors(hf_case):
  config, state, images, _ = hf_case
  kwargs, params = vit_weights.from_hf(config, state)
  h, w = images.shape[1:3]
  with pytest.raises(ValueError, match='resize_posemb'):
    vit.Model(**kwargs).apply({'params': params}, _images((h + 32, w)))
  if h != w:  # same token count, transposed grid: only posemb_grid catches it
    with pytest.raises(ValueError, match='resize_posemb'):
      vit.Model(**kwargs).apply({'params': params}, _images((w, h)))


# ---------------------------------------------------------------- knobs


def test_pool_types_and_sincos():
  images = _images((32, 48))  # 4x6 patch grid
  for pool, shape in [('tok', (2, 7)), ('gap', (2, 7)), ('map', (2, 7)), ('none', (2, 24, 7))]:
    model = vit.Model(**TINY, pool_type=pool)
    params = _random_params(model, (32, 48))
    assert ('cls' in params) == (pool == 'tok') and ('map_head' in params) == (pool == 'map')
    assert params['pos_embedding'].shape == (1, 24 + (pool == 'tok'), 64)
    assert _apply(model, params, images).shape == shape
  model = vit.Model(**TINY, posemb='sincos2d', representation_size=32)
  params = _random_params(model)
  assert 'pos_embedding' not in params and params['pre_logits']['kernel'].shape == (64, 32)
  for hw in [(32, 32), (48, 64)]:  # sin-cos works for any grid with the same params
    assert _apply(model, params, _images(hw)).shape == (2, 7)
  pe = vit.posemb_sincos_2d(4, 6, 64)
  assert pe.shape == (1, 24, 64) and len(np.unique(np.asarray(pe).round(5), axis=1)[0]) == 24


def test_resize_posemb():
  rng = np.random.RandomState(0)
  cls = rng.normal(size=(1, 1, 3)).astype(np.float32)
  posemb = np.concatenate([cls, rng.normal(size=(1, 35, 3)).astype(np.float32)], axis=1)
  for method in vit.POSEMB_RESAMPLING:
    np.testing.assert_array_equal(vit.resize_posemb(posemb, (5, 7), 1, old_grid_hw=(5, 7), method=method), posemb)

  # 'bilinear' maps the corner positions of both grids onto each other: a linear ramp a*i + b*j + c sampled
  # on the old grid stays exactly that ramp, borders included, and prefix tokens are untouched.
  def ramp(rows, cols):
    i, j = np.meshgrid(rows, cols, indexing='ij')
    return np.stack([2 * i - j, i + 3 * j + 1, -i], -1).reshape(1, len(rows) * len(cols), 3).astype(np.float32)

  down = vit.resize_posemb(np.concatenate([cls, ramp(np.arange(8), np.arange(12))], 1), (4, 6), 1,
                           old_grid_hw=(8, 12))
  np.testing.assert_array_equal(down[:, :1], cls)
  np.testing.assert_allclose(down[:, 1:], ramp(np.linspace(0, 7, 4), np.linspace(0, 11, 6)), atol=1e-5)
  up = vit.resize_posemb(ramp(np.arange(4), np.arange(4)), (7, 7), 0)
  np.testing.assert_allclose(up, ramp(np.linspace(0, 3, 7), np.linspace(0, 3, 7)), atol=1e-5)
  with pytest.raises(ValueError, match="'nearest' is unknown"):
    vit.resize_posemb(posemb, (6, 6), 1, old_grid_hw=(5, 7), method='nearest')

  # Fine-tuning at a new resolution: resize, then the model accepts the new grid.
  model = vit.Model(**TINY)
  params = _random_params(model)
  params['pos_embedding'] = vit.resize_posemb(params['pos_embedding'], (6, 8), 1)
  assert _apply(model, params, _images((48, 64))).shape == (2, 7)


@pytest.mark.parametrize('old, new', [(4, 7), (14, 9), (5, 12), (24, 7)], ids=['4to7', '14to9', '5to12', '24to7'])
@pytest.mark.parametrize('num_prefix', [1, 0], ids=['cls', 'no_cls'])
def test_resize_posemb_matches_timm_and_big_vision(old, new, num_prefix):
  """'bicubic' is timm's resample_abs_pos_embed (torch's antialiased bicubic); 'bilinear' is big_vision's
  resample_posemb, i.e. scipy.ndimage.zoom(order=1) of the grid."""
  import scipy.ndimage
  from timm.layers import pos_embed
  rng = np.random.RandomState(old * 100 + new)
  posemb = rng.normal(size=(1, num_prefix + old * old, 16)).astype(np.float32)
  want = pos_embed.resample_abs_pos_embed(torch.from_numpy(posemb), [new, new], num_prefix_tokens=num_prefix)
  got = vit.resize_posemb(posemb, (new, new), num_prefix, method='bicubic')
  assert got.shape == (1, num_prefix + new * new, 16)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)

  grid = posemb[0, num_prefix:].reshape(old, old, 16)
  want = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(1, new * new, 16)
  got = vit.resize_posemb(posemb, (new, new), num_prefix, method='bilinear')
  np.testing.assert_array_equal(got[:, :num_prefix], posemb[:, :num_prefix])
  np.testing.assert_allclose(got[:, num_prefix:], want, atol=1e-5, rtol=0)


def test_adapt_param_resamples_only_the_position_embedding():
  """The per-parameter hook of a run's init_params loader: the position embedding of a 4x4 grid fits a 6x6
  grid with either method (class token kept); anything else, or another width, is not adaptable (None)."""
  from timm.layers import pos_embed
  kwargs = dict(TINY)
  posemb = np.random.RandomState(1).normal(size=(1, 17, 64)).astype(np.float32)
  got = vit.adapt_param('pos_embedding', posemb, (1, 37, 64), kwargs, method='bicubic')
  want = pos_embed.resample_abs_pos_embed(torch.from_numpy(posemb), [6, 6], num_prefix_tokens=1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  got = vit.adapt_param('pos_embedding', posemb, (1, 37, 64), kwargs)
  np.testing.assert_array_equal(got, vit.resize_posemb(posemb, (6, 6), 1, method='bilinear'))
  assert vit.adapt_param('head/kernel', np.zeros((64, 7)), (64, 3), kwargs) is None
  assert vit.adapt_param('pos_embedding', posemb, (1, 37, 32), kwargs) is None
  # A non-square source grid needs the source model's posemb_grid (4x6 -> 6x6 here).
  wide = np.random.RandomState(2).normal(size=(1, 25, 64)).astype(np.float32)
  with pytest.raises(ValueError, match="24 grid tokens, not a square grid; set the source model's posemb_grid"):
    vit.adapt_param('pos_embedding', wide, (1, 37, 64), kwargs)
  got = vit.adapt_param('pos_embedding', wide, (1, 37, 64), kwargs, source_kwargs={'posemb_grid': (4, 6)})
  np.testing.assert_array_equal(got, vit.resize_posemb(wide, (6, 6), 1, old_grid_hw=(4, 6)))


def test_bfloat16_compute_float32_params():
  model = vit.Model(**TINY, dtype='bfloat16')
  params = _init(model)
  # Default init: zero head; N(0, 0.02) learned position embedding; zero class token.
  assert not np.any(params['head']['kernel']) and not np.any(params['cls'])
  assert 0.015 < np.std(params['pos_embedding']) < 0.025
  params = jax.tree.map(lambda x: x + 0.1, params)  # so the head is not all zero
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  images = _images((32, 32))
  got = _apply(model, params, images)
  want = _apply(vit.Model(**TINY), params, images)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
  assert not np.allclose(got, want, atol=1e-6)  # really computed in bfloat16


def test_dropout_only_in_train():
  model = vit.Model(**TINY, dropout=0.3)
  params = _random_params(model)
  images = _images((32, 32))
  ref = _apply(vit.Model(**TINY), params, images)
  np.testing.assert_array_equal(_apply(model, params, images, train=False), ref)
  train = lambda seed: _apply(model, params, images, train=True,
                                   rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(0), ref, atol=1e-3)
  assert not np.allclose(train(0), train(1), atol=1e-3)
  np.testing.assert_array_equal(train(2), train(2))


def test_remat_gradients_match():
  images = _images((32, 32))
  base = vit.Model(**TINY, dropout=0.1, scan=True)
  params = _random_params(base)

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({'params': p}, images, train=True,
                                         rngs={'dropout': jax.random.key(0)}) ** 2)
    return jax.jit(jax.grad(loss))(params)

  # Absolute tolerance on the scale of each gradient: remat changes XLA's fusion and so the order of float32
  # sums, which leaves ~1e-6 of a leaf's largest entry on its near-cancelling ones.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max())),
               grads(base.clone(remat=True)), grads(base))


@pytest.mark.parametrize('scan', [False, True])
def test_every_param_is_logically_partitioned(scan):
  model = vit.Model(**TINY, pool_type='map', representation_size=32, scan=scan)
  boxed = _abstract(model, boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == len(jax.tree.leaves(nn.meta.unbox(boxed)))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= LOGICAL_NAMES
  stacked = jax.tree.leaves(boxed['encoder']['blocks' if scan else 'block_0'],
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all((leaf.names[0] == 'layers') == scan for leaf in stacked)
  q = boxed['encoder']['blocks' if scan else 'block_0']['attn']['query']['kernel']
  assert q.names[-3:] == ('embed', 'heads', 'head_dim')


@pytest.mark.parametrize('scan', [False, True])
def test_sharded_run_matches_unsharded(scan):
  """Under a mesh with logical rules (tensor-parallel over heads/mlp) the output is unchanged."""
  model = vit.Model(**TINY, pool_type='map', scan=scan)
  params = _random_params(model)
  images = _images((32, 32), batch=4)
  want = _apply(model, params, images)  # no rules, no mesh: constraints are no-ops
  with nn.logical_axis_rules([('batch', 'data')]):  # rules without a mesh: still a no-op
    np.testing.assert_array_equal(_apply(model, params, images), want)

  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('batch', 'data'), ('heads', 'model'), ('mlp', 'model'), ('classes', None),
           ('embed', None), ('act_embed', None), ('length', None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = _abstract(model, boxed=True)  # init traces the param constraints under the mesh
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    fn = jax.jit(lambda p, x: model.apply({'params': p}, x))
    got = fn(sharded, jax.device_put(images, jax.NamedSharding(mesh, jax.P('data'))))
    hlo = fn.lower(sharded, images).as_text()
  block = sharded['encoder']['blocks' if scan else 'block_0']
  lead = (None,) * scan  # the unsharded 'layers' axis
  assert block['attn']['query']['kernel'].sharding.spec == jax.P(*lead, None, 'model', None)
  assert block['mlp']['fc2']['kernel'].sharding.spec == jax.P(*lead, 'model', None)
  assert 'sharding_constraint' in hlo or 'mhlo.sharding' in hlo
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- adapt_params


def test_adapt_params_to_a_new_resolution():
  """A ViT trained at 32x32 (4x4 patch grid) loads into the same ViT at 48x48 (6x6 grid)."""
  kwargs = dict(TINY)
  params = _init(vit.Model(**kwargs), (32, 32))
  target = vit.Model(**kwargs)
  target_shapes = common.abstract_params(target, (1, 48, 48, 3))
  assert params['pos_embedding'].shape == (1, 1 + 16, 64)
  assert target_shapes['pos_embedding'].shape == (1, 1 + 36, 64)

  adapted = vit.adapt_params(params, target_shapes, kwargs)
  assert jax.tree.structure(adapted) == jax.tree.structure(target_shapes)
  for got, want in zip(jax.tree.leaves(adapted), jax.tree.leaves(target_shapes)):
    assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(adapted['pos_embedding'][:, :1], params['pos_embedding'][:, :1])
  np.testing.assert_array_equal(adapted['pos_embedding'],
                                vit.resize_posemb(params['pos_embedding'], (6, 6), 1))
  for path in (('embedding', 'kernel'), ('cls',), ('head', 'kernel')):  # the rest is untouched
    leaf = lambda tree: functools.reduce(lambda t, k: t[k], path, tree)
    assert leaf(adapted) is leaf(params)
  adapted = jax.tree.map(lambda x: x + 0.1, adapted)  # non-zero head
  logits = _apply(target, adapted, _images((48, 48)))
  assert logits.shape == (2, 7) and np.all(np.isfinite(logits))

  # Host (numpy) params stay numpy; the same grid is a no-op; scan=True needs the same layout.
  host = jax.tree.map(np.asarray, params)
  assert isinstance(vit.adapt_params(host, target_shapes, kwargs)['pos_embedding'], np.ndarray)
  assert vit.adapt_params(params, common.abstract_params(target, (1, 32, 32, 3)), kwargs) is params
  scanned = {**kwargs, 'scan': True}
  scan_shapes = common.abstract_params(vit.Model(**scanned), (1, 48, 48, 3))
  adapted = vit.adapt_params(vit.stack_layers(host), scan_shapes, scanned)
  assert adapted['pos_embedding'].shape == (1, 37, 64)
  with pytest.raises(ValueError, match='stack_layers'):
    vit.adapt_params(host, scan_shapes, scanned)


def test_adapt_params_gap_and_non_square_grids():
  kwargs = dict(TINY, pool_type='gap')  # no class token: every token is a grid position
  params = _random_params(vit.Model(**kwargs), (32, 48))  # 4x6 grid
  target_kwargs = dict(kwargs, posemb_grid=(6, 8))
  target_shapes = common.abstract_params(vit.Model(**target_kwargs), (1, 48, 64, 3))
  with pytest.raises(ValueError, match='source_grid_hw'):  # 24 tokens: not a square grid
    vit.adapt_params(params, target_shapes, target_kwargs)
  adapted = vit.adapt_params(params, target_shapes, target_kwargs, source_grid_hw=(4, 6))
  np.testing.assert_array_equal(adapted['pos_embedding'],
                                vit.resize_posemb(params['pos_embedding'], (6, 8), 0, old_grid_hw=(4, 6)))
  assert _apply(vit.Model(**target_kwargs), adapted, _images((48, 64))).shape == (2, 7)
  with pytest.raises(ValueError, match='posemb_grid'):  # 48 target tokens, no posemb_grid: not square
    vit.adapt_params(params, target_shapes, kwargs, source_grid_hw=(4, 6))


def test_adapt_params_rejects_other_differences():
  params = _random_params(vit.Model(**TINY), (32, 32))
  for change, hw, shown in [(dict(width=32, num_heads=2), 48, 'cls (1, 1, 64) vs (1, 1, 32)'),
                            (dict(num_classes=5), 32, 'head/kernel (64, 7) vs (64, 5)'),
                            (dict(depth=3), 48, 'missing vs (64,)')]:
    kwargs = dict(TINY, **change)
    shapes = common.abstract_params(vit.Model(**kwargs), (1, hw, hw, 3))
    with pytest.raises(ValueError) as err:
      vit.adapt_params(params, shapes, kwargs)
    msg = str(err.value)
    assert '\n' not in msg and 'position embedding' in msg and shown in msg, msg
