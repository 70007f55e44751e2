"""LoRA and QLoRA: low-rank adapters on a frozen base (Hu et al. 2021; Dettmers et al. 2023, NF4 storage).

Every `models.common.Projection` (`x @ kernel`, the kernel [in..., out...]) whose kernel's name matches the regex
`params` gets two trainable factors beside its frozen kernel: `lora_a` [in..., rank] and `lora_b` [rank, out...]
(with a leading layer axis when the layers are scanned), and computes

    y = x @ kernel + scale * (dropout(x) @ lora_a) @ lora_b,    scale = alpha / rank (alpha / sqrt(rank): rslora)

`lora_a` starts uniform in +-1 / sqrt(fan_in) (PyTorch's default for a Linear layer, as peft draws it), `lora_b` at
zero, so the adapted model starts equal to the base. Dropout (rate `dropout`) acts on the adapter's input only,
in training only (when the objective passes a 'dropout' rng). The factors' logical axes are their kernel's: the
input axes for `lora_a`'s first, the output axes for `lora_b`'s last, the rank replicated.

QLoRA (`adapter.name='qlora'`, or quantize=True): the adapted kernels are stored in the frozen base as NF4 with
double quantisation (train/nf4.py): `kernel_nf4`, `kernel_absmax`, `kernel_scale`, `kernel_offset` instead of
`kernel`. Each layer dequantises its own kernel to the compute dtype where it uses it (inside the scanned layer),
so no full-precision copy of the base exists while training. Kernels of a scanned stack (names matching
`stacked`, by default anything under `layers/`) are quantised one layer at a time. A kernel whose last axis holds
whole blocks of 64 is stored in its own shape (`nf4.in_layout`) and its codes take the kernel's logical axes, so
FSDP and tensor parallelism split them as they split the kernel; other kernels are stored flat, split by rows.

`base_dtype` (e.g. 'bfloat16') stores the frozen base's other floating arrays (unquantised kernels, embeddings,
norms) in that dtype, as a base is loaded for LoRA in half precision: half the frozen bytes of float32. The
factors, their optimizer state and the NF4 scales stay float32.

The parameters are created by the model's own init, through a Flax method interceptor on Projection (`wrap`), and
applied through the same interceptor: the model itself is unchanged. Only `lora_a` and `lora_b` train, are
optimised and are checkpointed. `export` folds them into plain kernels (kernel + scale * lora_a @ lora_b, the
base dequantised first): what the run loader, evaluation and `train.convert export` see.
"""
from collections.abc import Mapping
import math
import re
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from models import common
from train import nf4

# Mistral's attention and MLP projections (q, k, v, o, gate, up, down), scanned or not.
DEFAULT_TARGETS = r'(.*/)?(attn/(query|key|value|out)|mlp/(gate|up|down))/kernel'
FACTORS = ('lora_a', 'lora_b')


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


def _nest(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def _module_of(name: str) -> str:
  return name.rsplit('/', 1)[0]


class Intercepted:
  """`model` whose init and apply run under a Flax method interceptor; everything else is the model's."""

  def __init__(self, model, interceptor, description: str):
    self.model, self.interceptor, self.description = model, interceptor, description

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self.interceptor):
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self.interceptor):
      return self.model.apply(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __repr__(self):
    return f'{self.model!r} + {self.description}'


class Lora:
  """Trainable low-rank factors on the kernels `params` matches; see the module docstring."""
  name = 'lora'
  # Parameters this adapter adds to the model: never in a source it loads (config.init_params), always seeded.
  new_params = r'(.*/)?lora_[ab]'

  def __init__(self, params: str = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               rslora: bool = False, quantize: bool = False, stacked: str = r'(.*/)?layers/.*',
               base_dtype: str | None = None):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
      raise ValueError(f'adapter.rank={rank!r} must be a whole number >= 1; set --config.adapter.rank.')
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
      raise ValueError(f'adapter.alpha={alpha!r} must be a number > 0; set --config.adapter.alpha.')
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
      raise ValueError(f'adapter.dropout={dropout!r} must be in [0, 1); set --config.adapter.dropout.')
    try:
      self.pattern, self.stacked = re.compile(params), re.compile(stacked)
    except re.error as e:
      raise ValueError(f'adapter.params={params!r} or adapter.stacked={stacked!r} is not a valid regex ({e}).'
                       ) from None
    self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
    self.rslora, self.quantize = rslora, quantize
    try:
      self.base_dtype = jnp.dtype(base_dtype) if base_dtype else None
    except TypeError:
      raise ValueError(f'adapter.base_dtype={base_dtype!r} is not a dtype; use e.g. \'bfloat16\'.') from None
    if self.base_dtype is not None and not jnp.issubdtype(self.base_dtype, jnp.floating):
      raise ValueError(f'adapter.base_dtype={base_dtype!r} is not a floating dtype; use e.g. \'bfloat16\'.')
    self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)

  def __repr__(self):
    return (f'{type(self).__name__}(params={self.pattern.pattern!r}, rank={self.rank}, alpha={self.alpha}, '
            f'dropout={self.dropout}, rslora={self.rslora}, quantize={self.quantize}, base_dtype={self.base_dtype})')

  # -- the model's side: parameters created at init, applied at every call --------------------------------------

  def wrap(self, model):
    return Intercepted(model, self._intercept, repr(self))

  def _intercept(self, next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != '__call__' or not isinstance(m, common.Projection):
      return next_fun(*args, **kwargs)
    adapted = bool(self.pattern.fullmatch('/'.join(m.path) + '/kernel'))
    quantized = m.has_variable('params', 'kernel_nf4')
    if not adapted and not quantized:
      return next_fun(*args, **kwargs)
    x = args[0]
    y = _dequantized_projection(m, x) if quantized else next_fun(*args, **kwargs)
    if not adapted:
      return y
    in_shape = tuple(x.shape[-m.num_in:])
    fan_in = math.prod(in_shape)
    bound = 1.0 / math.sqrt(fan_in)
    init_a = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    a = m.param('lora_a', common.boxed(init_a, (*m.kernel_axes[:m.num_in], None)), (*in_shape, self.rank))
    b = m.param('lora_b', common.boxed(nn.initializers.zeros, (None, *m.kernel_axes[m.num_in:])),
                (self.rank, *m.out_shape))
    h = x.astype(m.dtype)
    if self.dropout and not m.is_initializing() and m.has_rng('dropout'):
      keep = jax.random.bernoulli(m.make_rng('dropout'), 1.0 - self.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(m.dtype)
    low = jnp.tensordot(h, a.astype(m.dtype), axes=m.num_in)
    return y + (self.scale * jnp.tensordot(low, b.astype(m.dtype), axes=1)).astype(y.dtype)

  # -- the state's side: what trains, what stays frozen --------------------------------------------------------

  def split(self, params, rng=None):
    """(trainable: the lora factors, base: everything else, the adapted kernels in NF4 with quantize)."""
    del rng
    flat = _flat(params)
    trainable = {k: v for k, v in flat.items() if k.rsplit('/', 1)[-1] in FACTORS}
    if not trainable:
      kernels = [k for k in flat if k.endswith('/kernel')]
      raise ValueError(f'adapter.params={self.pattern.pattern!r} matches no projection kernel (a regex matched in '
                       f'full against names like {", ".join(map(repr, kernels[:3]))}); fix --config.adapter.params.')
    base = {k: v for k, v in flat.items() if k not in trainable}
    quantized = {}
    if self.quantize:  # From the float32 kernels; their scales stay float32.
      for module in sorted({_module_of(k) for k in trainable}):
        kernel = base.pop(f'{module}/kernel')
        for field, value in self._quantized(kernel, f'{module}/kernel').items():
          quantized[f'{module}/kernel_{field}'] = value
    base = {**{k: _cast(v, self.base_dtype) for k, v in base.items()}, **quantized}
    return _nest(trainable), _nest(base)

  def _quantized(self, kernel, name: str) -> dict[str, Any]:
    stacked = bool(self.stacked.fullmatch(name))
    boxed = isinstance(kernel, nn.meta.AxisMetadata)
    value = kernel.unbox() if boxed else kernel
    shape = value.shape[1:] if stacked else value.shape  # one layer's
    nf4.check_size(math.prod(shape), name)
    quantize = lambda v: nf4.in_layout(nf4.quantize(v), shape)
    quantize = jax.vmap(quantize) if stacked else quantize
    out = jax.eval_shape(quantize, value) if isinstance(value, jax.ShapeDtypeStruct) else quantize(value)
    if not boxed:
      return out
    lead = tuple(kernel.names[:1]) if stacked else ()
    if nf4.is_shaped(shape):
      # The codes in the kernel's layout take its logical axes; the absmax codes (one per 64 values, so a last
      # axis too short to split) the leading ones: a device slices the absmaxes of its columns locally.
      names = {'nf4': tuple(kernel.names), 'absmax': (*kernel.names[:-1], None)}
    else:  # Flat, row-major: the first axis's name, so each shard is a contiguous run of whole rows.
      names = {'nf4': lead + (kernel.names[len(lead)],), 'absmax': lead + (None,)}
    # The absmax codes' blocks of 256 scales are few (one float per 16,384 values) and replicated.
    names.update(scale=lead + (None,), offset=lead)
    return {f: kernel.replace(value=v, names=names[f]) for f, v in out.items()}

  def merge(self, trainable, base):
    """What the wrapped model applies: the base (quantised kernels as stored) with the factors beside it."""
    return _nest({**_flat(base), **_flat(trainable)})

  def export(self, trainable, base):
    """Plain parameters: each adapted kernel (dequantised) + scale * lora_a @ lora_b; the factors dropped."""
    flat_t, out = _flat(trainable), dict(_flat(base))
    for module in sorted({_module_of(k) for k in flat_t}):
      a, b = flat_t[f'{module}/lora_a'], flat_t[f'{module}/lora_b']
      stacked = bool(self.stacked.fullmatch(f'{module}/kernel'))
      delta = jax.vmap(jnp.tensordot, in_axes=(0, 0, None))(a, b, 1) if stacked else jnp.tensordot(a, b, 1)
      if f'{module}/kernel' in out:
        kernel = out[f'{module}/kernel']
      else:
        stored = {f: out.pop(f'{module}/kernel_{f}') for f in nf4.FIELDS}
        dequantize = lambda s, shape: nf4.dequantize(s, shape)
        kernel = (jax.vmap(dequantize, in_axes=(0, None))(stored, delta.shape[1:]) if stacked
                  else dequantize(stored, delta.shape))
      out[f'{module}/kernel'] = (kernel.astype(jnp.float32) + self.scale * delta).astype(kernel.dtype)
    return _nest(out)

  def describe(self, trainable, base) -> str:
    """One start-up line: the adapted kernels, rank and scale, and with quantize the stored base's bytes."""
    flat_b = _flat(base)
    modules = sorted({_module_of(k) for k in _flat(trainable)})
    line = f'adapter: LoRA rank {self.rank}, scale {self.scale:g} on {len(modules)} kernels'
    if self.quantize:
      stored = sum(v.size * v.dtype.itemsize for k, v in flat_b.items() if '/kernel_' in k)
      values = sum(2 * v.size for k, v in flat_b.items() if k.endswith('/kernel_nf4'))
      line += (f'; their frozen base in NF4: {stored / values:.4f} bytes per parameter ({values:,} parameters, '
               f'{stored / 2**20:.2f} MiB; float32 would be 4)')
    return line


def _cast(leaf, dtype):
  """A floating leaf (array, abstract shape, or either in a logical-axis box) in `dtype`; others as they are."""
  if dtype is None:
    return leaf
  if isinstance(leaf, nn.meta.AxisMetadata):
    return leaf.replace(value=_cast(leaf.unbox(apply_constraint=False), dtype))
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return leaf
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
  return leaf.astype(dtype)


class QLora(Lora):
  """LoRA over a base stored in NF4 (quantize=True); the defaults of Guanaco-7B: rank 64, alpha 16, dropout 0.1."""
  name = 'qlora'

  def __init__(self, params: str = DEFAULT_TARGETS, rank: int = 64, alpha: float = 16.0, dropout: float = 0.1,
               rslora: bool = False, stacked: str = r'(.*/)?layers/.*', base_dtype: str | None = None):
    super().__init__(params, rank, alpha, dropout, rslora, quantize=True, stacked=stacked, base_dtype=base_dtype)


def _dequantized_projection(m, x):
  """Projection `m` on `x` from its NF4 kernel (dequantised here, in m.dtype), plus its bias if it has one."""
  stored = {f: m.get_variable('params', f'kernel_{f}') for f in nf4.FIELDS}
  kernel = nf4.dequantize(stored, (*x.shape[-m.num_in:], *m.out_shape), m.dtype)
  y = jnp.tensordot(x.astype(m.dtype), kernel, axes=m.num_in)
  if m.use_bias:
    y = y + m.get_variable('params', 'bias').astype(m.dtype)
  return y
