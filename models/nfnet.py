"""NFNet (normaliser-free ResNets; Brock et al. 2021, arXiv 2102.06171) in Flax Linen.

The timm weight converter lives in nfnet_weights.py.

Usage::

  model = Model(variant='F0', num_classes=1000)
  params = nn.meta.unbox(model.init({'params': key}, images)['params'])
  logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})

Pretrained weights: `nfnet_weights.from_timm(state_dict, 'F0')` gives (model_kwargs, params); it stays
reachable as `nfnet.from_timm`.

Images are NHWC, conv kernels HWIO. `train=True` draws from the 'dropout' rng collection for both the
head dropout and stochastic depth. Per-stage activations are sown: with
`logits, state = model.apply(..., mutable=['intermediates'])`, `state['intermediates']['stem']['output'][0]`
is the stem output and `state['intermediates'][f'stage_{s}']['output'][0]` the output of stage s (0-based;
sown inside the 'stem' and 'stage_{s}' modules, whose names a sow from the top module would clash with).

Parameter names ('/'-joined): `stem/conv{1..}/{kernel,gain,bias}`,
`stage_{s}/block_{j}/{conv1,conv2,conv2b,conv3,shortcut}/{kernel,gain,bias}`,
`stage_{s}/block_{j}/se/{fc1,fc2}/{kernel,bias}`, `stage_{s}/block_{j}/skip_gain`,
`final_conv/{kernel,gain,bias}`, `head/{kernel,bias}` (stages and blocks counted from 0). Logical axes:
conv kernels (None, None, 'conv_in', 'conv_out'), gains and biases ('conv_out',), skip gains (), SE kernels
('conv_in', 'conv_out'), the classifier ('conv_in', 'classes') and ('classes',). Activations are constrained
to ('batch', None, None, 'act_conv'), a no-op without logical axis rules and a mesh.

Tiny inputs: TF "SAME" padding makes every stride-s layer output ceil(n/s) pixels, so no input collapses to 0
pixels (an 8x8 image reaches 1x1 in stage 2 with the default strides); `stem_strides` and `stage_strides`
keep small images spatially resolved, e.g. stem_strides=(1, 1, 1, 1) for 8x8 digits.
"""
from collections.abc import Callable, Mapping
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import common

_BASE_WIDTHS = (256, 512, 1536, 1536)
_PLUS_WIDTHS = (384, 768, 2048, 2048)
_DEPTH_PATTERN = (1, 2, 6, 3)
_DROPOUT = (0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5)
# name -> (widths, depths, dropout); 'F{n}+' is the wider variant, all else equal.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    f'F{n}{plus}': (widths, tuple(d * (n + 1) for d in _DEPTH_PATTERN), _DROPOUT[n])
    for plus, widths in (('', _BASE_WIDTHS), ('+', _PLUS_WIDTHS)) for n in range(8)}
# variant (without '+') -> (train, test) resolution from the paper.
RESOLUTIONS: dict[str, tuple[int, int]] = {
    'F0': (192, 256), 'F1': (224, 320), 'F2': (256, 352), 'F3': (320, 416),
    'F4': (384, 512), 'F5': (416, 544), 'F6': (448, 576), 'F7': (480, 608)}
# Activation gains making gamma * act(N(0, 1)) unit-variance (the reference code's constants).
GAMMAS: dict[str, float] = {'gelu': 1.7015043497085571, 'relu': 1.7139588594436646,
                            'silu': 1.7881293296813965}
NUMERICS = ('deepmind', 'timm')
BOTTLENECK_RATIO = 0.5
FINAL_CONV_MULT = 2
CONV_AXES = (None, None, 'conv_in', 'conv_out')
ACT_AXES = ('batch', None, None, 'act_conv')

Params = dict[str, Any]
Pair = common.Pair


class BlockArch(NamedTuple):
  in_ch: int
  out_ch: int
  mid: int  # bottleneck width
  groups: int
  stride: int
  beta: float
  drop_rate: float
  se_hidden: int

  @property
  def has_shortcut_conv(self) -> bool:
    return self.stride > 1 or self.in_ch != self.out_ch


class Arch(NamedTuple):
  stem: tuple[tuple[int, int], ...]  # (width, stride) of each 3x3 stem conv
  stages: tuple[tuple[BlockArch, ...], ...]
  final_width: int
  dropout: float


def bottleneck(out_ch: int, group_width: int, plus_stage1_width: str) -> tuple[int, int]:
  """(width, groups) of a block's grouped 3x3 convs.

  int(out_ch * 0.5) is kept when it is a multiple of group_width. Otherwise 'public' rounds it down to one
  (the released code: F+ stage 0, 192 -> 128) and 'paper' keeps it as one dense group (192 wide, which
  reproduces the paper's F4+ 527M params / 367B MACs). A width below group_width is one dense group in
  both modes (the reference would round it to 0), which is what small custom nets get.
  """
  mid = int(out_ch * BOTTLENECK_RATIO)
  if mid < group_width:
    return mid, 1
  if mid % group_width == 0:
    return mid, mid // group_width
  if plus_stage1_width == 'public':
    return mid // group_width * group_width, mid // group_width
  return mid, 1


def standardize_weight(kernel: jax.Array, gain: jax.Array, numerics: str = 'deepmind') -> jax.Array:
  """Scaled weight standardisation of an HWIO kernel, per output channel; float32 whatever the input.

  deepmind: (w - mean) * gain / sqrt(max(fan_in * var, 1e-4)); timm: (w - mean) / sqrt(var + 1e-5) * gain /
  sqrt(fan_in), with fan_in = kh * kw * in/groups and the population variance.
  """
  w = jnp.asarray(kernel, jnp.float32)
  fan_in = math.prod(w.shape[:-1])
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
  gain = jnp.asarray(gain, jnp.float32)
  if numerics == 'deepmind':
    scale = gain * jax.lax.rsqrt(jnp.maximum(fan_in * var, 1e-4))
  elif numerics == 'timm':
    scale = gain * jax.lax.rsqrt(var + 1e-5) / math.sqrt(fan_in)
  else:
    raise ValueError(f'numerics must be one of {NUMERICS}, got {numerics!r}')
  return (w - mean) * scale


def activation_fn(name: str, numerics: str) -> Callable[[jax.Array], jax.Array]:
  """gamma * act(x); GELU is tanh-approximated for 'deepmind' numerics and exact (erf) for 'timm'."""
  if name not in GAMMAS:
    raise ValueError(f'activation must be one of {sorted(GAMMAS)}, got {name!r}')
  fn = {'gelu': functools.partial(jax.nn.gelu, approximate=numerics == 'deepmind'),
        'relu': jax.nn.relu, 'silu': jax.nn.silu}[name]
  gamma = GAMMAS[name]
  return lambda x: fn(x) * gamma


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 mean with TF SAME padding (at the end), dividing by the number of valid entries."""
  h, w = x.shape[1:3]
  # A concrete zero init value makes this a differentiable window sum (a traced one would not be).
  total = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
  counts = [np.minimum(2, n - 2 * np.arange(-(-n // 2))) for n in (h, w)]
  return total / jnp.asarray(np.outer(*counts)[None, :, :, None], x.dtype)


CONV_IMPLS = ('auto', 'native', 'taps')


def resolve_conv_impl(impl: str) -> str:
  """'auto' is 'taps' on CPU (the backend computations go to) and 'native' elsewhere."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'taps' if jax.default_backend() == 'cpu' else 'native'
  return impl


def conv_same(x: jax.Array, w: jax.Array, stride: int, groups: int, impl: str = 'native') -> jax.Array:
  """TF-"SAME" convolution of NHWC `x` with an HWIO kernel.

  impl 'native' is XLA's (grouped) convolution. 'taps' computes a grouped convolution as one einsum per
  kernel tap over (group, in, out): the same numbers, several times faster on XLA:CPU, whose grouped
  convolution and above all its gradient are slow (a grouped 3x3 layer of F0, forward and backward:
  165-287 ms native, 42-68 ms taps). 'auto' picks taps on CPU and native on TPU and GPU.
  """
  impl = resolve_conv_impl(impl)
  if impl == 'native' or groups == 1:
    return jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups)
  kh, kw, cin_g, cout = w.shape
  b, h, wd, _ = x.shape
  oh, ow = -(-h // stride), -(-wd // stride)
  ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - wd, 0)
  x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))  # Extra pixel at the end.
  x = x.reshape(*x.shape[:3], groups, cin_g)
  w = w.reshape(kh, kw, cin_g, groups, cout // groups)
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = x[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
      y = jnp.einsum('bhwgc,cgo->bhwgo', tap, w[i, j])
      out = y if out is None else out + y
  return out.reshape(b, oh, ow, cout)


class WSConv(nn.Module):
  """Conv with scaled weight standardisation (statistics in float32), a learnable gain and a bias."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  numerics: str = 'deepmind'
  conv_impl: str = 'native'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    kernel = self.param('kernel', common.boxed(init, CONV_AXES), (k, k, x.shape[-1] // self.groups, self.features))
    gain = self.param('gain', common.boxed(nn.initializers.ones, ('conv_out',)), (self.features,))
    bias = self.param('bias', common.boxed(nn.initializers.zeros, ('conv_out',)), (self.features,))
    w = standardize_weight(kernel, gain, self.numerics).astype(self.dtype)
    y = conv_same(x.astype(self.dtype), w, self.stride, self.groups, self.conv_impl)
    return y + bias.astype(self.dtype)


class Linear(nn.Module):
  """`x @ kernel + bias`, params created directly so the logical boxes survive an active mesh."""
  features: int
  kernel_axes: tuple[str | None, str | None]
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', common.boxed(self.kernel_init, self.kernel_axes), (x.shape[-1], self.features))
    bias = self.param('bias', common.boxed(nn.initializers.zeros, self.kernel_axes[1:]), (self.features,))
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class SqueezeExcite(nn.Module):
  """x * 2 * sigmoid(fc2(relu(fc1(mean_hw(x))))); ReLU as in the released code, not the paper's GELU."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    h = nn.relu(Linear(self.hidden, ('conv_in', 'conv_out'), dtype=self.dtype, name='fc1')(h))
    h = Linear(x.shape[-1], ('conv_in', 'conv_out'), dtype=self.dtype, name='fc2')(h)
    return x * (2.0 * nn.sigmoid(h))[:, None, None, :].astype(x.dtype)


class NFBlock(nn.Module):
  """Pre-activation bottleneck.

  out = act(x) * beta; branch = SE(conv3(act(conv2b(act(conv2(act(conv1(out))))))));
  returns shortcut + alpha * skip_gain * stochastic_depth(branch), with shortcut x, conv1x1(out) on a
  channel change, or conv1x1(avg_pool_2x2(out)) on stride 2.
  """
  spec: BlockArch
  alpha: float
  activation: str
  numerics: str
  dtype: Any
  conv_impl: str = 'native'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s, act = self.spec, activation_fn(self.activation, self.numerics)
    conv = functools.partial(WSConv, numerics=self.numerics, conv_impl=self.conv_impl, dtype=self.dtype)
    out = act(x) * s.beta
    shortcut = x
    if s.stride > 1:
      shortcut = conv(s.out_ch, name='shortcut')(avg_pool_2x2(out))
    elif s.in_ch != s.out_ch:
      shortcut = conv(s.out_ch, name='shortcut')(out)
    out = conv(s.mid, name='conv1')(out)
    out = conv(s.mid, 3, s.stride, s.groups, name='conv2')(act(out))
    out = conv(s.mid, 3, 1, s.groups, name='conv2b')(act(out))
    out = conv(s.out_ch, name='conv3')(act(out))
    out = SqueezeExcite(s.se_hidden, self.dtype, name='se')(out)
    if train and s.drop_rate > 0:
      # Per-example drop, kept examples NOT rescaled by 1/keep (as the reference code).
      u = jax.random.uniform(self.make_rng('dropout'), (x.shape[0], 1, 1, 1), jnp.float32)
      out = out * jnp.floor(1.0 - s.drop_rate + u).astype(out.dtype)
    skip_gain = self.param('skip_gain', common.boxed(nn.initializers.zeros, ()), ())
    return out * skip_gain.astype(out.dtype) * self.alpha + shortcut


class Stem(nn.Module):
  """3x3 WS convs conv1..convN, the activation between them and none after the last."""
  layers: tuple[tuple[int, int], ...]
  activation: str
  numerics: str
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_fn(self.activation, self.numerics)
    for i, (width, stride) in enumerate(self.layers):
      x = act(x) if i else x
      x = WSConv(width, 3, stride, numerics=self.numerics, dtype=self.dtype, name=f'conv{i + 1}')(x)
    x = nn.with_logical_constraint(x, ACT_AXES)
    self.sow('intermediates', 'output', x)
    return x


class Stage(nn.Module):
  """Blocks block_0..block_{n-1}; the first carries the stage's stride and channel change."""
  blocks: tuple[BlockArch, ...]
  alpha: float
  activation: str
  numerics: str
  dtype: Any
  conv_impl: str = 'native'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for j, spec in enumerate(self.blocks):
      x = NFBlock(spec, self.alpha, self.activation, self.numerics, self.dtype, self.conv_impl,
                  name=f'block_{j}')(x, train)
      x = nn.with_logical_constraint(x, ACT_AXES)
    self.sow('intermediates', 'output', x)
    return x


class Model(nn.Module):
  """NFNet classifier. `__call__(images [b, h, w, c], train)` -> float32 logits [b, num_classes].

  `variant` ('F0'..'F7', 'F0+'..'F7+') sets widths, depths and dropout; explicit fields override it, and
  without a variant `widths` and `depths` must be given (dropout then defaults to 0). `stem_widths` defaults
  to (16, 32, 64, widths[0] // 2), `stem_strides` to (2, 1, ..., 1, 2), `stage_strides` (each 1 or 2) to
  (1, 2, 2, ...). `numerics`: 'deepmind' (tanh GELU, WS max(fan_in * var, 1e-4)) or 'timm' (erf GELU,
  var + 1e-5; matches timm's dm_nfnet_*). `plus_stage1_width`: see `bottleneck` ('public' gives F3+ 423.4M,
  F4+ 525.0M, F7+ 829.6M params; 'paper' F3+ 425.1M, F4+ 527.0M, F7+ 832.9M). `dtype` is the compute dtype;
  params are float32 and weight standardisation runs in float32. num_classes=0 drops the classifier and
  returns the pooled features. `conv_impl` 'taps' computes the grouped 3x3 convs as per-tap einsums, for
  speed on CPU (see `conv_same`); parameters and outputs are the same as with 'native'; 'auto'
  picks taps on CPU and native on TPU and GPU.
  """
  num_classes: int = 1000
  variant: str | None = None
  widths: tuple[int, ...] | None = None
  depths: tuple[int, ...] | None = None
  stem_widths: tuple[int, ...] | None = None
  stem_strides: tuple[int, ...] | None = None
  stage_strides: tuple[int, ...] | None = None
  dropout: float | None = None
  stochastic_depth: float = 0.25
  numerics: str = 'deepmind'
  plus_stage1_width: str = 'public'
  activation: str = 'gelu'
  alpha: float = 0.2
  se_ratio: float = 0.5
  group_width: int = 128
  dtype: str = 'float32'
  conv_impl: str = 'native'

  def arch(self) -> Arch:
    """The resolved architecture: stem layers, per-block specs (with beta and drop rate), final width."""
    widths, depths, dropout = self.widths, self.depths, self.dropout
    if self.variant is not None:
      if self.variant not in VARIANTS:
        raise ValueError(f'Unknown NFNet variant {self.variant!r}; valid: {", ".join(VARIANTS)}.')
      v_widths, v_depths, v_dropout = VARIANTS[self.variant]
      widths = v_widths if widths is None else widths
      depths = v_depths if depths is None else depths
      dropout = v_dropout if dropout is None else dropout
    if widths is None or depths is None:
      raise ValueError('NFNet needs widths and depths: set both or pick a variant such as "F0".')
    widths, depths, n = tuple(widths), tuple(depths), len(widths)
    stem_widths = tuple(self.stem_widths or (16, 32, 64, widths[0] // 2))
    default_stem_strides = ((2,) + (1,) * (len(stem_widths) - 2) + (2,))[-len(stem_widths):]
    stem_strides = tuple(self.stem_strides or default_stem_strides)
    stage_strides = tuple(self.stage_strides or (1,) + (2,) * (n - 1))
    if len(depths) != n or len(stage_strides) != n or len(stem_strides) != len(stem_widths):
      raise ValueError(f'NFNet lengths differ: widths {widths}, depths {depths}, stage_strides '
                       f'{stage_strides}; stem_widths {stem_widths}, stem_strides {stem_strides}.')
    if not set(stage_strides) <= {1, 2}:
      raise ValueError(f'stage_strides must be 1 or 2 (2x2 average-pool shortcut), got {stage_strides}')
    if self.plus_stage1_width not in ('public', 'paper'):
      raise ValueError(f"plus_stage1_width must be 'public' or 'paper', got {self.plus_stage1_width!r}")
    if self.numerics not in NUMERICS:
      raise ValueError(f'numerics must be one of {NUMERICS}, got {self.numerics!r}')
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}')

    total, index, ch = sum(depths), 0, stem_widths[-1]
    expected_std, stages = 1.0, []
    for out_ch, depth, stride in zip(widths, depths, stage_strides):
      mid, groups = bottleneck(out_ch, self.group_width, self.plus_stage1_width)
      blocks = []
      for j in range(depth):
        blocks.append(BlockArch(ch, out_ch, mid, groups, stride if j == 0 else 1, 1.0 / expected_std,
                                self.stochastic_depth * index / total, max(1, int(out_ch * self.se_ratio))))
        ch, index = out_ch, index + 1
        # Reset after each stage's first block, whose shortcut conv restarts the signal (reference rule).
        expected_std = math.sqrt((1.0 if j == 0 else expected_std) ** 2 + self.alpha**2)
      stages.append(tuple(blocks))
    return Arch(tuple(zip(stem_widths, stem_strides)), tuple(stages), FINAL_CONV_MULT * ch, dropout or 0.0)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    a, dtype = self.arch(), jnp.dtype(self.dtype)
    shared = dict(activation=self.activation, numerics=self.numerics, dtype=dtype)
    x = Stem(a.stem, **shared, name='stem')(images.astype(dtype))
    for s, blocks in enumerate(a.stages):
      x = Stage(blocks, self.alpha, **shared, conv_impl=self.conv_impl, name=f'stage_{s}')(x, train)
    x = WSConv(a.final_width, numerics=self.numerics, dtype=dtype, name='final_conv')(x)
    x = activation_fn(self.activation, self.numerics)(x)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    x = nn.Dropout(a.dropout)(x, deterministic=not train)
    if self.num_classes:
      x = Linear(self.num_classes, ('conv_in', 'classes'), nn.initializers.normal(0.01), dtype,
                 name='head')(x)
    return x.astype(jnp.float32)


def count(model_kwargs: Mapping[str, Any], image_hw: Pair = (224, 224), channels: int = 3) -> dict[str, int]:
  """Analytic parameter and multiply-accumulate counts for one image of size image_hw with `channels`.

  params: conv kernels, WS gains and biases, SE kernels and biases, skip gains and the classifier.
  macs: conv MACs (out_h * out_w * kh * kw * in/groups * out, SAME padding: out = ceil(in / stride)), the SE
  dense layers and the classifier. Not counted: biases, weight standardisation (per weight, not per image),
  activations, pooling, SE gating and residual adds. At the test resolution this reproduces the paper's
  "FLOPs" (F0 12.38B at 256).
  """
  model = Model(**model_kwargs)
  a = model.arch()
  h, w = common.pair(image_hw)
  totals = {'params': 0, 'macs': 0}

  def conv(h: int, w: int, k: int, cin: int, cout: int, stride: int = 1, groups: int = 1) -> tuple[int, int]:
    oh, ow = -(-h // stride), -(-w // stride)
    totals['params'] += k * k * (cin // groups) * cout + 2 * cout
    totals['macs'] += oh * ow * k * k * (cin // groups) * cout
    return oh, ow

  def dense(cin: int, cout: int) -> None:
    totals['params'] += cin * cout + cout
    totals['macs'] += cin * cout

  ch = channels
  for width, stride in a.stem:
    h, w = conv(h, w, 3, ch, width, stride)
    ch = width
  for blocks in a.stages:
    for b in blocks:
      if b.stride > 1:
        conv(-(-h // 2), -(-w // 2), 1, b.in_ch, b.out_ch)
      elif b.in_ch != b.out_ch:
        conv(h, w, 1, b.in_ch, b.out_ch)
      conv(h, w, 1, b.in_ch, b.mid)
      h, w = conv(h, w, 3, b.mid, b.mid, b.stride, b.groups)
      conv(h, w, 3, b.mid, b.mid, 1, b.groups)
      conv(h, w, 1, b.mid, b.out_ch)
      dense(b.out_ch, b.se_hidden)
      dense(b.se_hidden, b.out_ch)
      totals['params'] += 1  # skip gain
      ch = b.out_ch
  conv(h, w, 1, ch, a.final_width)
  if model.num_classes:
    dense(a.final_width, model.num_classes)
  return totals


def forward_flops(model_kwargs: Mapping[str, Any], input_shape: tuple[int, ...]) -> float:
  """Forward FLOPs of one (H, W, C) image: 2 x the convolution and dense MACs of `count`."""
  h, w, c = input_shape
  return 2.0 * count(model_kwargs, (h, w), c)['macs']


def param_count(model_kwargs: Mapping[str, Any], image_hw: Pair = (224, 224), channels: int = 3) -> int:
  """Number of parameters: `count`'s, which equals the traced count (tests/models/test_nfnet.py) and takes
  milliseconds where tracing an F-series net's init takes seconds."""
  return count(model_kwargs, image_hw, channels)['params']


def __getattr__(name: str) -> Any:
  # The timm converter lives in models/nfnet_weights.py; imported on first use (no import cycle).
  if name == 'from_timm':
    from models import nfnet_weights
    return nfnet_weights.from_timm
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
