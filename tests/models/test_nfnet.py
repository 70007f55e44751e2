"""Tests for models/nfnet.py and nfnet_weights.py: sizes and MACs against the paper, timm equivalence, training
behaviour, WS."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from models import common, nfnet, nfnet_weights

# The CPU-sized net for 8x8 digits from the model docs.
TINY = dict(num_classes=10, widths=(32, 64, 96, 96), depths=(1, 1, 1, 1))
LOGICAL_NAMES = {'conv_in', 'conv_out', 'classes', None}


def _abstract(model: nfnet.Model, hw=(16, 16), boxed=False):
  params = jax.eval_shape(model.init, {'params': jax.random.key(0)}, jnp.zeros((1, *hw, 3)))['params']
  return params if boxed else nn.meta.unbox(params)


def _random_params(model: nfnet.Model, hw=(16, 16), seed=0):
  """Non-trivial values everywhere (gains, biases and skip gains non-zero); faster than init on CPU."""
  rng = np.random.RandomState(seed)

  def fill(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    name = path[-1].key
    if name in ('gain', 'skip_gain'):
      return 1.0 + 0.2 * noise
    return 0.1 * noise if name == 'bias' else noise / np.sqrt(np.prod(x.shape[:-1]))

  return jax.tree_util.tree_map_with_path(fill, _abstract(model, hw))


@functools.cache
def _jitted(model: nfnet.Model):
  return jax.jit(functools.partial(model.apply, mutable=['intermediates']), static_argnames='train')


def _apply(model, params, images, train=False, seed=0):
  """Jitted apply -> (logits, {'stem' | 'stage_{s}': activation}); one compile per (model, shape, train)."""
  rngs = {'dropout': jax.random.key(seed)}
  logits, state = _jitted(model)({'params': params}, images, train=train, rngs=rngs)
  return logits, {k: v['output'][0] for k, v in state['intermediates'].items()}


def _images(hw, batch=2, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).normal(size=(batch, *hw, 3)).astype(np.float32)


# ---------------------------------------------------------------- sizes

# (kwargs, expected params, tolerance): exact for F0, else the paper's (or the documented) 0.1M rounding.
PAPER_PARAMS = [
    (dict(variant='F0'), 71_489_284, 0), (dict(variant='F1'), 132.6e6, 0.05e6),
    (dict(variant='F2'), 193.8e6, 0.05e6), (dict(variant='F3'), 254.9e6, 0.05e6),
    (dict(variant='F4'), 316.1e6, 0.05e6), (dict(variant='F5'), 377.2e6, 0.05e6),
    (dict(variant='F6'), 438.4e6, 0.05e6), (dict(variant='F7'), 499.5e6, 0.05e6),
    (dict(variant='F3+'), 423.4e6, 0.05e6), (dict(variant='F3+', plus_stage1_width='paper'), 425.1e6, 0.05e6),
    (dict(variant='F4+'), 525.0e6, 0.05e6), (dict(variant='F4+', plus_stage1_width='paper'), 527.0e6, 0.05e6),
    (dict(variant='F7+'), 829.6e6, 0.05e6), (dict(variant='F7+', plus_stage1_width='paper'), 832.9e6, 0.05e6),
]
# Also traced with eval_shape (1-3 s each on CPU); F7, F4+ and F7+ 'paper' go through the analytic counter
# only, which equals eval_shape on these and on custom nets.
TRACED = [dict(variant=v) for v in ('F0', 'F1', 'F2', 'F3', 'F4', 'F5', 'F6', 'F3+', 'F7+')] + [
    dict(variant='F3+', plus_stage1_width='paper')]


@pytest.mark.parametrize('kwargs,want,tol', PAPER_PARAMS, ids=lambda x: str(x) if isinstance(x, dict) else '')
def test_param_counts(kwargs, want, tol):
  analytic = nfnet.count(kwargs, 224)['params']
  assert abs(analytic - want) <= tol
  if kwargs in TRACED:
    assert common.count_params(nfnet.Model(**kwargs), (1, 16, 16, 3)) == nfnet.param_count(kwargs) == analytic


@pytest.mark.parametrize('kwargs', [
    TINY, dict(TINY, num_classes=0),
    dict(widths=(48, 300, 640), depths=(2, 1, 3), stem_widths=(8, 24), stem_strides=(1, 2),
         stage_strides=(2, 1, 2), group_width=64, se_ratio=0.25, num_classes=3, plus_stage1_width='paper'),
    dict(widths=(48, 300, 640), depths=(2, 1, 3), group_width=64, plus_stage1_width='public'),
], ids=['tiny', 'no_head', 'odd_paper', 'odd_public'])
def test_counter_params_match_eval_shape_custom(kwargs):
  assert nfnet.count(kwargs, (9, 13))['params'] == common.count_params(nfnet.Model(**kwargs), (1, 9, 13, 3))
  assert nfnet.param_count(kwargs, channels=1) == common.count_params(nfnet.Model(**kwargs), (1, 9, 13, 1))


def test_plus_stage1_width_switch():
  assert nfnet.bottleneck(384, 128, 'public') == (128, 1)
  assert nfnet.bottleneck(384, 128, 'paper') == (192, 1)
  assert nfnet.bottleneck(2048, 128, 'public') == nfnet.bottleneck(2048, 128, 'paper') == (1024, 8)
  assert nfnet.bottleneck(96, 128, 'public') == (48, 1)  # narrower than a group: one dense group, not 0
  for plus in ('public', 'paper'):
    stage0 = nfnet.Model(variant='F0+', plus_stage1_width=plus).arch().stages[0][0]
    assert stage0.mid == (128 if plus == 'public' else 192)
  assert nfnet.Model(variant='F0+').arch().stem[-1] == (192, 2)


@pytest.mark.parametrize('variant,want', [('F0', 12.38), ('F1', 35.54), ('F2', 62.59), ('F3', 114.76),
                                          ('F4', 215.24), ('F5', 289.76), ('F6', 377.28)])
def test_macs_at_test_resolution(variant, want):
  test_res = nfnet.RESOLUTIONS[variant][1]
  assert round(nfnet.count(dict(variant=variant), test_res)['macs'] / 1e9, 2) == want


@pytest.mark.parametrize('variant,want', [('F0', 9.49), ('F1', 17.44), ('F3', 33.34), ('F7', 65.14)])
def test_macs_at_224(variant, want):
  assert round(nfnet.count(dict(variant=variant), (224, 224))['macs'] / 1e9, 2) == want
  wider = nfnet.count(dict(variant=variant), (224, 225))['macs']
  assert wider > nfnet.count(dict(variant=variant), 224)['macs']


def test_plus_macs_per_switch():
  # The paper's F4+ (527M, 367B MACs at 512) needs the 192-wide stage-0 bottleneck.
  paper = nfnet.count(dict(variant='F4+', plus_stage1_width='paper'), 512)
  assert round(paper['params'] / 1e6) == 527 and round(paper['macs'] / 1e9) == 367
  assert round(nfnet.count(dict(variant='F4+'), 512)['macs'] / 1e9) == 333


def test_counter_macs_match_xla():
  """Per-image XLA flops (batch 2 minus batch 1: the per-weight standardisation cancels) ~ 2 * MACs.

  XLA skips kernel taps that fall on padding and adds the elementwise ops, so it lands within a few %
  of 2 * MACs on a net kept at 64x64 / 32x32 (small borders).
  """
  kwargs = dict(widths=(128, 256), depths=(1, 2), stem_widths=(16, 32), stem_strides=(1, 1),
                stage_strides=(1, 2), num_classes=10)
  model = nfnet.Model(**kwargs)
  params = _abstract(model, (64, 64))

  def flops(batch):
    images = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
    return jax.jit(model.apply).lower({'params': params}, images).cost_analysis()['flops']

  ratio = (flops(2) - flops(1)) / (2 * nfnet.count(kwargs, (64, 64))['macs'])
  assert 0.97 < ratio < 1.03


# ---------------------------------------------------------------- timm


def _randomize_torch(model: torch.nn.Module, seed: int = 0) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith('bias'):
        p.copy_(0.1 * noise)
      elif name.endswith('gain'):  # WS gains (out, 1, 1, 1) and scalar skip gains, all non-zero
        p.copy_(1.0 + 0.2 * noise)
      elif 'attn_last' in name or 'head' in name:
        p.copy_(noise / p[0].numel() ** 0.5)
      else:  # conv weights, with per-channel offsets that the standardisation must remove
        p.copy_(noise + torch.randn(p.shape[0], 1, 1, 1, generator=g))


@pytest.fixture(scope='module')
def timm_f0():
  torch.manual_seed(0)
  model = timm.create_model('dm_nfnet_f0', pretrained=False).eval()
  _randomize_torch(model)
  acts = {}
  for name, module in [('stem', model.stem)] + [(f'stage_{s}', m) for s, m in enumerate(model.stages)]:
    module.register_forward_hook(
        lambda m, i, o, name=name: acts.__setitem__(name, o.numpy().transpose(0, 2, 3, 1)))
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  kwargs, params = nfnet_weights.from_timm(state, 'F0')
  return model, acts, kwargs, params


def test_timm_params_match_init_tree(timm_f0):
  _, _, kwargs, params = timm_f0
  assert kwargs == dict(variant='F0', num_classes=1000, numerics='timm')
  expected = _abstract(nfnet.Model(**kwargs))
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
  assert params['stage_0']['block_0']['conv2']['kernel'].shape == (3, 3, 128, 128)  # groups of 128
  assert params['stage_2']['block_0']['conv2']['kernel'].shape == (3, 3, 128, 768)


@pytest.mark.parametrize('hw', [(192, 192), (201, 175)], ids=['192', '201x175'])
def test_timm_f0_matches(timm_f0, hw):
  torch_model, acts, kwargs, params = timm_f0
  images = _images(hw)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  got, inter = _apply(nfnet.Model(**kwargs), params, images)
  assert set(inter) == set(acts)
  for name, act in acts.items():
    np.testing.assert_allclose(inter[name], act, rtol=1e-4, atol=1e-5 * np.abs(act).max(), err_msg=name)
  assert got.dtype == jnp.float32 and np.abs(want).std() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_converter_reachable_from_model_module():
  assert nfnet.from_timm is nfnet_weights.from_timm
  assert getattr(nfnet, 'adapt_params', None) is None  # unknown names still raise AttributeError
  with pytest.raises(AttributeError):
    nfnet.no_such_name


def test_timm_rejects_unknown_layout(timm_f0):
  torch_model, _, _, _ = timm_f0
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  with pytest.raises(ValueError, match='extra.weight'):
    nfnet_weights.from_timm({**state, 'extra.weight': np.ones(3, np.float32)}, 'dm_nfnet_f0')
  with pytest.raises(ValueError, match='stages.0.1.conv1.weight'):
    nfnet_weights.from_timm(state, 'F1')


# ---------------------------------------------------------------- training behaviour


def test_stochastic_depth_and_dropout():
  # block_0 (global index 0 of 2) never drops; block_1 (stage_1) drops with rate 0.6 * 1/2 = 0.3.
  model = nfnet.Model(widths=(16, 16), depths=(1, 1), stem_widths=(8, 8), stem_strides=(1, 1),
                      stage_strides=(1, 1), num_classes=3, dropout=0.5, stochastic_depth=0.6)
  assert [b.drop_rate for s in model.arch().stages for b in s] == [0.0, 0.3]
  params = _random_params(model, (4, 4))
  images = _images((4, 4), batch=4000)
  logits, ref = _apply(model, params, images)
  np.testing.assert_array_equal(_apply(model, params, images, seed=1)[0], logits)  # eval: deterministic
  train_logits, train = _apply(model, params, images, train=True, seed=1)
  np.testing.assert_array_equal(train['stage_0'], ref['stage_0'])  # rate 0: untouched
  # Each example either equals the eval value (kept, NOT rescaled by 1/0.7) or skips the branch.
  same = lambda a, b: np.isclose(a, b, rtol=1e-6, atol=1e-6).all(axis=(1, 2, 3))
  kept, dropped = same(train['stage_1'], ref['stage_1']), same(train['stage_1'], ref['stage_0'])
  assert np.all(kept ^ dropped)
  assert abs(dropped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(images))
  # Head dropout acts in train only, per feature with 1/keep scaling: kept examples' logits change too.
  changed = ~np.isclose(train_logits, logits, rtol=1e-5, atol=1e-5).all(axis=1)
  assert changed[kept].mean() > 0.99
  train2 = _apply(model, params, images, train=True, seed=2)[1]['stage_1']
  assert not np.array_equal(train2, train['stage_1'])
  assert nfnet.Model(variant='F3').arch().dropout == 0.4 and nfnet.Model(**TINY).arch().dropout == 0.0


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize('numerics', ['deepmind', 'timm'])
def test_weight_standardization_float32(numerics):
  rng = np.random.RandomState(0)
  kernel = (rng.normal(size=(3, 3, 8, 5)) + rng.normal(size=5)).astype(np.float32)
  kernel[..., 0] = 1e-4 * rng.normal(size=(3, 3, 8))  # tiny variance: the epsilon forms differ here
  gain = (1 + 0.2 * rng.normal(size=5)).astype(np.float32)
  w, fan_in = kernel.astype(np.float64), 72
  mean, var = w.mean(axis=(0, 1, 2)), w.var(axis=(0, 1, 2))
  if numerics == 'deepmind':
    want = (w - mean) * gain / np.sqrt(np.maximum(fan_in * var, 1e-4))
  else:
    want = (w - mean) / np.sqrt(var + 1e-5) * gain / np.sqrt(fan_in)
  for dtype in (jnp.float32, jnp.bfloat16):
    got = nfnet.standardize_weight(jnp.asarray(kernel).astype(dtype), gain, numerics)
    assert got.dtype == jnp.float32
    if dtype == jnp.float32:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='numerics'):
    nfnet.standardize_weight(kernel, gain, 'torch')


def test_bfloat16_compute_float32_params():
  params = _random_params(nfnet.Model(**TINY))
  model = nfnet.Model(**TINY, dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_abstract(model)))
  images = _images((16, 16))
  got, inter = _apply(model, params, images)
  want, _ = _apply(nfnet.Model(**TINY), params, images)
  assert got.dtype == jnp.float32 and inter['stage_3'].dtype == jnp.bfloat16
  np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
  assert not np.allclose(got, want, atol=1e-6)  # really computed in bfloat16
  # The standardised kernels entering the convolutions come from float32 statistics.
  eqns = list(_eqns(jax.make_jaxpr(lambda p: model.apply({'params': p}, images))(params).jaxpr))
  rsqrt = [e for e in eqns if e.primitive.name == 'rsqrt']  # only weight standardisation uses rsqrt
  convs = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
  assert len(rsqrt) == len(convs) == 4 + 4 * 5 + 1
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in rsqrt)
  assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)


def _eqns(jaxpr):
  """All equations of a jaxpr, recursing into sub-jaxprs (jit, custom_jvp...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      sub = getattr(param, 'jaxpr', param)
      if hasattr(sub, 'eqns'):
        yield from _eqns(sub)


def test_activations_and_numerics():
  x = jnp.linspace(-3, 3, 7)
  gamma = 1.7015043497085571
  erf, tanh = nfnet.activation_fn('gelu', 'timm')(x), nfnet.activation_fn('gelu', 'deepmind')(x)
  np.testing.assert_allclose(erf, jax.nn.gelu(x, approximate=False) * gamma)
  np.testing.assert_allclose(tanh, jax.nn.gelu(x, approximate=True) * gamma)
  assert not np.allclose(erf, tanh)
  np.testing.assert_allclose(nfnet.activation_fn('silu', 'deepmind')(x), jax.nn.silu(x) * 1.7881293296813965)
  np.testing.assert_allclose(nfnet.activation_fn('relu', 'timm')(x), jax.nn.relu(x) * 1.7139588594436646)
  with pytest.raises(ValueError, match='activation'):
    nfnet.activation_fn('tanh', 'timm')


def test_avg_pool_divides_by_valid_entries():
  x = np.arange(2 * 5 * 3 * 1, dtype=np.float32).reshape(2, 5, 3, 1)
  got = np.asarray(nfnet.avg_pool_2x2(jnp.asarray(x)))
  assert got.shape == (2, 3, 2, 1)
  np.testing.assert_allclose(got[:, 2, 1], x[:, 4, 2])  # corner window has a single valid entry
  np.testing.assert_allclose(got[:, 0, 1], x[:, 0:2, 2].mean(axis=1))
  np.testing.assert_allclose(got[:, 1, 0], x[:, 2:4, 0:2].mean(axis=(1, 2)))


# ---------------------------------------------------------------- structure and knobs


@pytest.mark.parametrize('hw', [(8, 8), (16, 16)])
def test_tiny_net_runs_on_small_inputs(hw):
  model = nfnet.Model(**TINY)
  params = _random_params(model, hw)
  logits, inter = _apply(model, params, _images(hw))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits)) and np.abs(logits).max() > 1e-3
  assert inter['stage_3'].shape == (2, max(1, hw[0] // 32), max(1, hw[1] // 32), 96)
  # A stride-1 stem keeps 8x8 digits at 8x8 through stage 0 (shapes only: no compile).
  model = nfnet.Model(**TINY, stem_strides=(1, 1, 1, 1))
  shapes = jax.eval_shape(functools.partial(model.apply, mutable=['intermediates']), {'params': params},
                          _images(hw))[1]['intermediates']
  assert shapes['stage_0']['output'][0].shape == (2, *hw, 32)
  assert shapes['stage_1']['output'][0].shape == (2, hw[0] // 2, hw[1] // 2, 64)


def test_every_param_is_logically_partitioned():
  boxed = _abstract(nfnet.Model(**{**TINY, 'widths': (32, 64, 96, 128), 'depths': (1, 1, 1, 2)}), boxed=True)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
  assert len(flat) == len(jax.tree.leaves(nn.meta.unbox(boxed)))
  axes = {}
  for path, leaf in flat:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= LOGICAL_NAMES
    axes['/'.join(p.key for p in path)] = leaf.names
  assert axes['stem/conv1/kernel'] == (None, None, 'conv_in', 'conv_out')
  assert axes['stage_3/block_0/shortcut/gain'] == ('conv_out',) == axes['final_conv/bias']
  assert axes['stage_0/block_0/skip_gain'] == ()
  assert axes['stage_1/block_0/se/fc1/kernel'] == ('conv_in', 'conv_out')
  assert axes['head/kernel'] == ('conv_in', 'classes') and axes['head/bias'] == ('classes',)
  convs = {f'{c}/{w}' for c in ('conv1', 'conv2', 'conv2b', 'conv3', 'shortcut')
           for w in ('kernel', 'gain', 'bias')}
  se = {f'se/{fc}/{w}' for fc in ('fc1', 'fc2') for w in ('kernel', 'bias')}
  assert {p.split('/', 2)[-1] for p in axes if p.startswith('stage_2/block_0/')} == convs | se | {'skip_gain'}
  assert 'stage_3/block_1/conv1/kernel' in axes and 'stage_3/block_1/shortcut/kernel' not in axes
  assert all(p.rsplit('/', 1)[-1] in ('kernel', 'gain', 'bias', 'skip_gain') for p in axes)


def test_logical_constraints_are_noops_and_shard():
  model = nfnet.Model(**TINY)
  params = _random_params(model)
  images = _images((16, 16))
  want, _ = _apply(model, params, images)
  rules = (('batch', 'data'), ('act_conv', None), ('conv_in', None), ('conv_out', 'model'), ('classes', None))
  def constraints():
    jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, images))(params).jaxpr
    return [e for e in _eqns(jaxpr) if e.primitive.name == 'sharding_constraint']

  assert constraints() == []
  with nn.logical_axis_rules(rules):  # rules without a mesh: still no constraint
    assert constraints() == []
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert len(constraints()) >= 1 + 4  # stem and every block
    boxed = _abstract(model, boxed=True)  # init traces the param constraints under the mesh
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    images_sharded = jax.device_put(images, jax.NamedSharding(mesh, jax.P('data')))
    got = jax.jit(model.apply)({'params': sharded}, images_sharded)
  assert sharded['stage_1']['block_0']['conv1']['kernel'].sharding.spec == jax.P(None, None, None, 'model')
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_variant_and_bad_fields():
  with pytest.raises(ValueError) as err:
    nfnet.Model(variant='F9').arch()
  msg = str(err.value)
  assert '\n' not in msg and "'F9'" in msg and all(v in msg for v in nfnet.VARIANTS)
  for bad in (dict(numerics='torch'), dict(plus_stage1_width='x'), dict(stage_strides=(1, 3, 2, 2)),
              dict(depths=(1, 1, 1))):
    with pytest.raises(ValueError):
      nfnet.Model(**{**TINY, **bad}).arch()
  with pytest.raises(ValueError, match='widths and depths'):
    nfnet.Model(widths=(32,)).arch()
  assert nfnet.Model(variant='F2', depths=(1, 1, 1, 1)).arch().final_width == 3072


@pytest.mark.parametrize('hw, stride', [((9, 7), 1), ((9, 7), 2), ((8, 8), 2)])
def test_taps_grouped_conv_equals_native(hw, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *hw, 12)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 9)), jnp.float32)  # 3 groups of 4 in -> 3 out channels.
  native = nfnet.conv_same(x, w, stride, 3, 'native')
  taps = nfnet.conv_same(x, w, stride, 3, 'taps')
  assert taps.shape == native.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 9)
  np.testing.assert_allclose(taps, native, rtol=1e-5, atol=1e-5)
  loss = lambda impl: lambda x, w: jnp.sum(jnp.sin(nfnet.conv_same(x, w, stride, 3, impl)))
  for g_taps, g_native in zip(jax.grad(loss('taps'), (0, 1))(x, w), jax.grad(loss('native'), (0, 1))(x, w)):
    np.testing.assert_allclose(g_taps, g_native, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    nfnet.conv_same(x, w, stride, 3, 'fft')
  # 'auto' picks per backend: taps on CPU (these tests), XLA's convolution on TPU and GPU.
  assert nfnet.resolve_conv_impl('auto') == ('taps' if jax.default_backend() == 'cpu' else 'native')
  np.testing.assert_array_equal(nfnet.conv_same(x, w, stride, 3, 'auto'), taps)


def test_model_with_taps_convs_equals_native():
  kwargs = dict(num_classes=5, widths=(32, 64), depths=(1, 2), group_width=8, stem_widths=(8, 16))
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 15, 17, 3)), jnp.float32)
  native = nfnet.Model(**kwargs)
  params = nn.meta.unbox(native.init(jax.random.key(0), images)['params'])
  params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # Non-zero skip gains and head.
  want = native.apply({'params': params}, images)
  got = nfnet.Model(**kwargs, conv_impl='taps').apply({'params': params}, images)
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
