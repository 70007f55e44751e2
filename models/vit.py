"""Vision Transformer (ViT) family in Flax Linen (timm / HF weight converters: vit_weights.py).

Usage::

  model = Model(num_classes=1000, variant='B/16')
  params = nn.meta.unbox(model.init({'params': key}, images)['params'])
  logits = model.apply({'params': params}, images, train=False)  # [b, classes]

Pretrained weights: `vit_weights.from_timm(state_dict, num_heads)` / `vit_weights.from_hf(config,
state_dict)` give (model_kwargs, params); they stay reachable as `vit.from_timm` / `vit.from_hf`.
`adapt_params` fits trained params to a model at another resolution (resamples the position
embedding: big_vision's bilinear or timm's antialiased bicubic, `resample_grid`); `adapt_param` is the same for
one parameter, the hook a run's init_params loader calls; `stack_layers` / `unstack_layers` convert between
scan=False and scan=True params.

Images are NHWC. Every parameter is boxed with logical axis names at init
('embed', 'mlp', 'heads', 'head_dim', 'classes', 'layers', None); the residual
stream is constrained to ('batch', 'length', 'act_embed'), which is a no-op
unless logical axis rules and a mesh are active.
"""
from collections.abc import Callable, Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import common

# name -> (width, depth, mlp_dim, num_heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
    'So400m': (1152, 27, 4304, 16),  # shape-optimised ViT (Alabdulmohsin et al. 2023)
}
POS_EMBED_STD = 0.02  # timm / HF convention for learned position embeddings
RESIDUAL_AXES = ('batch', 'length', 'act_embed')

Params = dict[str, Any]
Pair = common.Pair


def _dense(features: int, names: tuple[str | None, ...], dtype: Any, name: str,
           kernel_init: Callable = nn.initializers.xavier_uniform(),
           bias_init: Callable = nn.initializers.zeros) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=common.boxed(kernel_init, names),
                  bias_init=common.boxed(bias_init, names[-1:]))


def _layernorm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  # Flax LayerNorm computes its statistics in at least float32.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=common.boxed(nn.initializers.ones, ('embed',)),
                      bias_init=common.boxed(nn.initializers.zeros, ('embed',)))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2-D sin-cos embedding [1, h*w, width] (row-major grid), as in big_vision."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width % 4 == 0, got {width}')
  y, x = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  omega = jnp.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / temperature**omega
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return pe[None].astype(jnp.float32)


# How a learned position embedding is resampled to another patch grid (`resize_posemb`'s `method`).
POSEMB_RESAMPLING = ('bilinear', 'bicubic')


def _linear_taps(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of big_vision's resampling, `scipy.ndimage.zoom(order=1)`: the first and last grid
  positions of both grids coincide (corner-aligned) and values in between are linear; no anti-aliasing."""
  taps = np.zeros((n_out, n_in))
  where = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
  left = np.minimum(np.floor(where).astype(int), n_in - 1)
  right = np.minimum(left + 1, n_in - 1)
  frac = where - left
  np.add.at(taps, (np.arange(n_out), left), 1 - frac)
  np.add.at(taps, (np.arange(n_out), right), frac)
  return taps


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel. torch's antialiased bicubic uses a = -0.5 (PIL's choice); its plain
  bicubic uses -0.75, so the two modes differ even when upsampling."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialiased_cubic_taps(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of `torch.nn.functional.interpolate(mode='bicubic', antialias=True,
  align_corners=False)`, which timm's `resample_abs_pos_embed` calls.

  Output i is centred at (i + 1/2) * n_in / n_out in input pixels. When shrinking, the kernel is stretched by
  the shrink factor so that it low-pass filters instead of skipping pixels. Taps that would fall outside the
  grid are dropped and each row is renormalised to sum to 1 (no edge padding).
  """
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  taps = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = scale * (i + 0.5)
    # int() truncates towards zero like the C++ kernel's casts, which sets where each window starts.
    lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
    weights = _keys_cubic((np.arange(lo, hi) - centre + 0.5) / stretch)
    taps[i, lo:hi] = weights / weights.sum()
  return taps


def resample_grid(grid: jax.Array | np.ndarray, new_hw: Pair, method: str = 'bilinear') -> jax.Array:
  """[h, w, d] values on a grid -> [new_h, new_w, d], separably, computed in float32.

  'bilinear': big_vision's `resample_posemb` (scipy.ndimage.zoom, order 1, corner-aligned, no anti-aliasing).
  'bicubic': timm's `resample_abs_pos_embed` default (torch's bicubic with antialias=True).
  """
  taps = {'bilinear': _linear_taps, 'bicubic': _antialiased_cubic_taps}.get(method)
  if taps is None:
    raise ValueError(f'position embedding resampling {method!r} is unknown; choose one of {POSEMB_RESAMPLING}.')
  (h, w, _), (nh, nw) = grid.shape, common.pair(new_hw)
  rows, cols = (jnp.asarray(taps(n, m), jnp.float32) for n, m in ((h, nh), (w, nw)))
  return jnp.einsum('yh,hwd,xw->yxd', rows, jnp.asarray(grid, jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


def resize_posemb(posemb: jax.Array | np.ndarray, new_grid_hw: Pair, num_prefix_tokens: int,
                  old_grid_hw: Pair | None = None, method: str = 'bilinear') -> jax.Array:
  """Resamples learned embeddings [1, prefix + h*w, d] to a new patch grid with `resample_grid`'s `method`.

  Prefix (class) token embeddings are kept as they are (timm's layout: they come first). `old_grid_hw`
  defaults to a square grid. The same grid returns `posemb` unchanged.
  """
  posemb = jnp.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  n, d = grid.shape[1], grid.shape[2]
  if old_grid_hw is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f'{n} grid tokens are not a square grid; pass old_grid_hw')
    old_grid_hw = (side, side)
  oh, ow = common.pair(old_grid_hw)
  nh, nw = common.pair(new_grid_hw)
  if oh * ow != n:
    raise ValueError(f'old_grid_hw {(oh, ow)} does not match {n} grid tokens')
  if (oh, ow) == (nh, nw):
    return posemb
  grid = resample_grid(grid.reshape(oh, ow, d), (nh, nw), method)
  grid = grid.reshape(1, nh * nw, d).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense."""
  mlp_dim: int
  dropout: float
  gelu_approximate: bool
  deterministic: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    bias_init = nn.initializers.normal(1e-6)
    x = _dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, 'fc1', bias_init=bias_init)(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=self.deterministic)
    return _dense(width, ('mlp', 'embed'), self.dtype, 'fc2', bias_init=bias_init)(x)


class Attention(nn.Module):
  """Multi-head attention with separate per-head q/k/v projections (shardable over heads)."""
  num_heads: int
  qkv_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array) -> jax.Array:
    width = x_kv.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    proj = lambda name: common.Projection((self.num_heads, head_dim), ('embed', 'heads', 'head_dim'),
                                          use_bias=self.qkv_bias, dtype=self.dtype, name=name)
    q, k, v = proj('query')(x_q), proj('key')(x_kv), proj('value')(x_kv)
    logits = jnp.einsum('...qhd,...khd->...hqk', q * head_dim**-0.5, k)
    # Softmax in float32 even for bfloat16 compute.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('...hqk,...khd->...qhd', weights, v)
    return common.Projection((width,), ('heads', 'head_dim', 'embed'), num_in=2, dtype=self.dtype,
                             name='out')(out)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)).

  Takes and returns a (carry, None) pair so it can be used directly under nn.scan.
  """
  num_heads: int
  mlp_dim: int
  dropout: float
  qkv_bias: bool
  gelu_approximate: bool
  layernorm_epsilon: float
  deterministic: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    y = _layernorm(self.layernorm_epsilon, self.dtype, 'ln1')(x)
    y = Attention(self.num_heads, self.qkv_bias, self.dtype, name='attn')(y, y)
    x = x + drop(y)
    y = _layernorm(self.layernorm_epsilon, self.dtype, 'ln2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.deterministic,
                 self.dtype, name='mlp')(y)
    x = x + drop(y)
    return nn.with_logical_constraint(x, RESIDUAL_AXES), None


class Encoder(nn.Module):
  """Stack of `depth` blocks ('block_{i}', or one scanned 'blocks') and 'ln_final'."""
  depth: int
  block_kwargs: Mapping[str, Any]
  layernorm_epsilon: float
  scan: bool
  remat: bool
  remat_policy: str
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block_cls = EncoderBlock
    if self.remat:
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan,
                           policy=getattr(jax.checkpoint_policies, self.remat_policy))
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True}, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**self.block_kwargs, name='blocks')(x, None)
    else:
      for i in range(self.depth):
        x, _ = block_cls(**self.block_kwargs, name=f'block_{i}')(x)
    return _layernorm(self.layernorm_epsilon, self.dtype, 'ln_final')(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over tokens, then an MLP."""
  num_heads: int
  mlp_dim: int
  qkv_bias: bool
  gelu_approximate: bool
  layernorm_epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = common.boxed(nn.initializers.normal(POS_EMBED_STD), (None, None, 'embed'))
    probe = self.param('probe', init, (1, 1, x.shape[-1]))
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = Attention(self.num_heads, self.qkv_bias, self.dtype, name='attn')(probe, x)
    y = _layernorm(self.layernorm_epsilon, self.dtype, 'ln')(x)
    x = x + MlpBlock(self.mlp_dim, 0.0, self.gelu_approximate, True, self.dtype, name='mlp')(y)
    return x[:, 0]


class Model(nn.Module):
  """ViT classifier. `__call__(images [b, h, w, c], train)` -> float32 logits [b, num_classes].

  `variant` ('Ti/16', 'B/16', 'L/14', 'g/14', ...) sets width/depth/mlp_dim/num_heads
  and patch size; any explicitly set field overrides it. Without a variant all five
  must be given. pool_type: 'tok' (class token, the only mode with one), 'gap' (mean of
  tokens), 'map' (attention pooling) or 'none' (per-token logits [b, n, num_classes]).
  num_classes=0 drops the head and returns the (pre-logits) features.

  posemb 'learn' holds `pos_embedding` [1, n_prefix + h*w, width] (class token first,
  timm layout), initialised N(0, 0.02). Its patch grid is fixed at init; a different
  input grid raises an error telling you to call `resize_posemb`. When `posemb_grid`
  is set the grid itself is checked, otherwise only the token count (so a transposed
  non-square grid is not caught). 'sincos2d' is fixed and works for any grid.
  """
  num_classes: int = 1000
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: Pair | None = None
  posemb: str = 'learn'
  posemb_grid: Pair | None = None
  pool_type: str = 'tok'
  representation_size: int | None = None
  head_zeroinit: bool = True
  dropout: float = 0.0
  dtype: str = 'float32'
  layernorm_epsilon: float = 1e-6
  gelu_approximate: bool = False
  qkv_bias: bool = True
  scan: bool = False
  remat: bool = False
  remat_policy: str = 'nothing_saveable'

  def dims(self) -> dict[str, Any]:
    """Resolved width, depth, mlp_dim, num_heads and (h, w) patch_size."""
    dims: dict[str, Any] = {}
    if self.variant is not None:
      name, _, patch = self.variant.partition('/')
      if name not in VARIANTS or (patch and not patch.isdigit()):
        raise ValueError(f'Unknown ViT variant {self.variant!r}; valid: '
                         f'{", ".join(VARIANTS)} with an optional "/<patch>", e.g. "B/16".')
      dims = dict(zip(('width', 'depth', 'mlp_dim', 'num_heads'), VARIANTS[name]))
      if patch:
        dims['patch_size'] = int(patch)
    for key in ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size'):
      if getattr(self, key) is not None:
        dims[key] = getattr(self, key)
      if key not in dims:
        raise ValueError(f'ViT needs {key!r}: set it or pick a variant such as "B/16".')
    dims['patch_size'] = common.pair(dims['patch_size'])
    return dims

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    d = self.dims()
    width, dtype = d['width'], jnp.dtype(self.dtype)
    if self.pool_type not in ('tok', 'gap', 'map', 'none'):
      raise ValueError(f"pool_type must be 'tok', 'gap', 'map' or 'none', got {self.pool_type!r}")
    ph, pw = d['patch_size']
    if images.shape[1] % ph or images.shape[2] % pw:
      raise ValueError(f'image size {tuple(images.shape[1:3])} is not divisible by the ViT patch size {(ph, pw)}: '
                       'resize the images to a multiple of the patch size (the resize or crop of the '
                       'preprocessing) or choose a patch_size that divides the image size.')

    x = nn.Conv(width, (ph, pw), strides=(ph, pw), padding='VALID', dtype=dtype, name='embedding',
                kernel_init=common.boxed(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                bias_init=common.boxed(nn.initializers.zeros, ('embed',)))(images)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, width)

    num_prefix = 0
    if self.pool_type == 'tok':
      cls = self.param('cls', common.boxed(nn.initializers.zeros, (None, None, 'embed')), (1, 1, width))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, width)), x], axis=1)
      num_prefix = 1

    if self.posemb == 'learn':
      x = x + self._learned_posemb(gh, gw, num_prefix, width).astype(x.dtype)
    elif self.posemb == 'sincos2d':
      pe = posemb_sincos_2d(gh, gw, width)
      pe = jnp.pad(pe, ((0, 0), (num_prefix, 0), (0, 0)))  # no position for the class token
      x = x + pe.astype(x.dtype)
    else:
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)

    block_kwargs = dict(
        num_heads=d['num_heads'], mlp_dim=d['mlp_dim'], dropout=self.dropout,
        qkv_bias=self.qkv_bias, gelu_approximate=self.gelu_approximate,
        layernorm_epsilon=self.layernorm_epsilon, deterministic=not train, dtype=dtype)
    x = Encoder(d['depth'], block_kwargs, self.layernorm_epsilon, self.scan, self.remat,
                self.remat_policy, dtype, name='encoder')(x)

    if self.pool_type == 'tok':
      x = x[:, 0]
    elif self.pool_type == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.pool_type == 'map':
      x = MAPHead(d['num_heads'], d['mlp_dim'], self.qkv_bias, self.gelu_approximate,
                  self.layernorm_epsilon, dtype, name='map_head')(x)

    head_in = 'embed'
    if self.representation_size:
      # Output axis left unnamed: 'embed' may not appear twice in one kernel.
      x = nn.tanh(_dense(self.representation_size, ('embed', None), dtype, 'pre_logits',
                         kernel_init=nn.initializers.lecun_normal())(x))
      head_in = None
    if self.num_classes:
      kernel_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = _dense(self.num_classes, (head_in, 'classes'), dtype, 'head', kernel_init=kernel_init)(x)
    return x.astype(jnp.float32)

  def _learned_posemb(self, gh: int, gw: int, num_prefix: int, width: int) -> jax.Array:
    hint = (f"resize it with resize_posemb(params['pos_embedding'], {(gh, gw)}, "
            f'num_prefix_tokens={num_prefix})')
    if self.posemb_grid is not None and common.pair(self.posemb_grid) != (gh, gw):
      raise ValueError(f'Input patch grid {(gh, gw)} != posemb_grid {common.pair(self.posemb_grid)} '
                       f'of the learned position embedding; {hint} and set posemb_grid.')
    n = num_prefix + gh * gw
    if self.has_variable('params', 'pos_embedding'):
      have = jnp.shape(nn.meta.unbox(self.get_variable('params', 'pos_embedding')))
      if have[1] != n:
        raise ValueError(f'pos_embedding has {have[1]} tokens but input patch grid {(gh, gw)} '
                         f'needs {n}; {hint}.')
    init = common.boxed(nn.initializers.normal(POS_EMBED_STD), (None, None, 'embed'))
    return self.param('pos_embedding', init, (1, n, width))


def forward_flops(model_kwargs: Mapping[str, Any], input_shape: tuple[int, ...]) -> float:
  """Forward FLOPs of one (H, W, C) image: 2 x the MACs of the patch embedding, every block's q/k/v/out
  projections, attention scores and weighted sum (N^2 terms) and MLP, the pooling head and the classifier.
  Norms, softmax, GELU, biases and position embeddings are left out."""
  model = Model(**model_kwargs)
  d = model.dims()
  width, mlp, (ph, pw) = d['width'], d['mlp_dim'], d['patch_size']
  h, w, c = input_shape
  patches = (h // ph) * (w // pw)
  tokens = patches + (model.pool_type == 'tok')

  def attention(queries: int, keys: int) -> int:
    projections = (2 * queries + 2 * keys) * width * width  # q and out per query, k and v per key
    return projections + 2 * queries * keys * width  # scores and weighted sum over all heads

  macs = patches * ph * pw * c * width
  macs += d['depth'] * (attention(tokens, tokens) + 2 * tokens * width * mlp)
  outputs = 1
  if model.pool_type == 'map':
    macs += attention(1, tokens) + 2 * width * mlp
  elif model.pool_type == 'none':
    outputs = tokens
  features = width
  if model.representation_size:
    macs += outputs * width * model.representation_size
    features = model.representation_size
  macs += outputs * features * model.num_classes
  return 2.0 * macs


def param_count(model_kwargs: Mapping[str, Any], image_hw: Pair = (224, 224), channels: int = 3) -> int:
  """Number of parameters, computed abstractly with jax.eval_shape (no memory)."""
  h, w = common.pair(image_hw)
  return common.count_params(Model(**model_kwargs), (1, h, w, channels))


def stack_layers(params: Params) -> Params:
  """Converts scan=False params (encoder/block_{i}) to scan=True (encoder/blocks, stacked)."""
  return {**params, 'encoder': common.stack_layers(params['encoder'], 'block_', 'blocks')}


def unstack_layers(params: Params) -> Params:
  """Converts scan=True params (encoder/blocks, stacked) to scan=False (encoder/block_{i})."""
  return {**params, 'encoder': common.unstack_layers(params['encoder'], 'block_', 'blocks')}


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(x)) for path, x in leaves}


def adapt_params(params: Params, target_shapes: Any, model_kwargs: Mapping[str, Any], *,
                 source_grid_hw: Pair | None = None, method: str = 'bilinear') -> Params:
  """Fits the params of a trained ViT to a model of the same architecture at another resolution.

  `target_shapes` is the target model's abstract parameter tree (jax.ShapeDtypeStruct
  leaves, e.g. `common.abstract_params(Model(**model_kwargs), (1, h, w, 3))`) and
  `model_kwargs` its kwargs. The learned `pos_embedding` is resized to the target's
  patch grid with `resize_posemb` and `method` (class token kept as it is); every other entry is
  returned unchanged. The target grid is `posemb_grid` if set, else square; the source
  grid is `source_grid_hw` if given, else square. Raises ValueError if anything other
  than the position embedding differs (in shape or in tree structure, e.g. scan=True
  against scan=False params: convert those with stack_layers / unstack_layers first).
  This is the hook the tools' run loader calls (`getattr(models_module, 'adapt_params', None)`)
  when a checkpoint's shapes differ from the model's; a run's init_params go through `adapt_param`.
  """
  have, want = _shapes_by_path(params), _shapes_by_path(target_shapes)
  resizable = lambda k: k == 'pos_embedding' and k in have and k in want
  differ = sorted(k for k in have.keys() | want.keys() if not resizable(k) and have.get(k) != want.get(k))
  if differ:
    scanned = lambda shapes: any(k.startswith('encoder/blocks/') for k in shapes)
    if scanned(have) != scanned(want):
      raise ValueError(f'ViT params are in the scan={scanned(have)} layout, the target model in scan='
                       f'{scanned(want)}; convert them with stack_layers / unstack_layers first.')
    shown = ', '.join(f'{k} {have.get(k, "missing")} vs {want.get(k, "missing")}' for k in differ[:3])
    more = f' (and {len(differ) - 3} more)' if len(differ) > 3 else ''
    raise ValueError(f'ViT params differ from the target model beyond the position embedding '
                     f'(checkpoint vs target): {shown}{more}; only the patch grid may change.')
  if 'pos_embedding' not in want or have['pos_embedding'] == want['pos_embedding']:
    return params

  old, new = have['pos_embedding'], want['pos_embedding']
  if old[0] != new[0] or old[2] != new[2]:
    raise ValueError(f'pos_embedding {old} vs target {new}: only the token count may differ.')
  posemb = params['pos_embedding']
  resized = _resized_posemb(posemb, new, model_kwargs, source_grid_hw, method, 'source_grid_hw')
  if isinstance(posemb, np.ndarray):  # host arrays stay host arrays
    resized = np.asarray(resized)
  return {**params, 'pos_embedding': resized}


def _resized_posemb(posemb, target_shape: tuple[int, ...], model_kwargs: Mapping[str, Any],
                    source_grid_hw: Pair | None, method: str, source_hint: str) -> jax.Array:
  """`posemb` resampled to the token count of `target_shape`, for the model `model_kwargs` builds."""
  model = Model(**model_kwargs)
  num_prefix = int(model.pool_type == 'tok')  # the class token comes first, with its own embedding

  def grid(n: int, grid_hw: Pair | None, what: str, hint: str) -> tuple[int, int]:
    if grid_hw is not None:
      gh, gw = common.pair(grid_hw)
    else:
      gh = gw = math.isqrt(n)
    if gh * gw != n:
      raise ValueError(f'the {what} pos_embedding has {n} grid tokens, not a '
                       f'{"square" if grid_hw is None else f"{gh}x{gw}"} grid; set {hint}.')
    return gh, gw

  old_grid = grid(posemb.shape[1] - num_prefix, source_grid_hw, 'checkpoint', source_hint)
  new_grid = grid(target_shape[1] - num_prefix, model.posemb_grid, 'target', 'posemb_grid')
  return resize_posemb(posemb, new_grid, num_prefix, old_grid_hw=old_grid, method=method)


def adapt_param(name: str, value: Any, target_shape: tuple[int, ...], model_kwargs: Mapping[str, Any], *,
                source_kwargs: Mapping[str, Any] | None = None, method: str = 'bilinear') -> Any:
  """The run loader's hook for one loaded parameter whose shape differs from this model's: `value` fitted to
  `target_shape`, or None when it cannot be fitted (the loader then refuses the source).

  `name` is the '/'-joined parameter path. Only the learned position embedding ('pos_embedding') adapts: it is
  resampled with `method` (see `resample_grid`) from the source's patch grid (`source_kwargs`' posemb_grid,
  else square) to the target's (`model_kwargs`' posemb_grid, else square); its class token is kept.
  """
  shape = tuple(np.shape(value))
  if name != 'pos_embedding' or len(shape) != 3 or len(target_shape) != 3:
    return None
  if (shape[0], shape[2]) != (target_shape[0], target_shape[2]):
    return None  # another width: not a resolution change
  source_grid = (source_kwargs or {}).get('posemb_grid')
  return _resized_posemb(value, tuple(target_shape), model_kwargs, source_grid, method,
                         "the source model's posemb_grid")


def __getattr__(name: str) -> Any:
  # The timm / HF converters live in models/vit_weights.py; imported on first use (no import cycle).
  if name in ('from_timm', 'from_hf'):
    from models import vit_weights
    return getattr(vit_weights, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
