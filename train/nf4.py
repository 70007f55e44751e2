"""4-bit NormalFloat (NF4) with double quantisation, QLoRA's storage for a frozen base (Dettmers et al. 2023).

A tensor is flattened and cut into blocks of `BLOCK` = 64 values. Each block is divided by its absolute maximum
(its absmax) and every value is stored as the 4-bit index of the nearest of the 16 NF4 levels (two per byte,
the first value in the high nibble). Double quantisation stores the absmaxes themselves in 8 bits: their mean
(`offset`) is subtracted, and they are quantised in blocks of `SCALE_BLOCK` = 256 with the signed dynamic 8-bit
map (`dynamic_map`), each of those blocks with its own float32 absmax (`scale`). Stored bits per value:
4 + 8 / 64 + 32 / (64 * 256) = 4.127 (plain float32 absmaxes would cost 4.5).

The levels, the nearest-level rule, the nibble order and the dynamic map are bitsandbytes' (`quantize_4bit` with
quant_type='nf4', `quantize_blockwise`, `create_dynamic_map`); tests/train/test_nf4.py compares them value for
value. The last block of scales may be partial (bitsandbytes pads it the same way); the number of values must
divide into blocks of 64.

`in_layout` stores a kernel whose last axis holds whole blocks in the kernel's own shape ([..., last / 2] codes,
[..., last / 64] absmax codes): the same values in the same row-major order, so the same bytes, but a shard of
the kernel along any of its axes (FSDP's rows, tensor parallelism's columns) then holds whole blocks, and each
device dequantises its own shard without communication. Other tensors stay flat.

Everything here is jax.numpy and works on traced arrays: quantisation runs inside the jitted split of the adapter,
dequantisation inside each layer of the model.
"""
import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
SCALE_BLOCK = 256
# The 16 NF4 levels in index order (QLoRA appendix E; bitsandbytes' get_4bit_type('nf4')).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
FIELDS = ('nf4', 'absmax', 'scale', 'offset')  # Stored arrays of one quantised tensor, by suffix.


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """The signed dynamic (tree) quantisation map: 256 sorted float32 values in [-1, 1].

  For each exponent i < max_exponent_bits, 2^i + 1 evenly spaced points in [0.1, 1] give 2^i midpoints, scaled
  by 10^(i - max_exponent_bits + 1), with both signs; then 0 and 1; zeros fill the rest to 2^total_bits.
  """
  values = []
  for i in range(max_exponent_bits):
    edges = _linspace32(0.1, 1.0, 2**i + 1)
    mids = (edges[:-1] + edges[1:]) / np.float32(2.0)
    scale = 10.0**(-(max_exponent_bits - 1) + i)
    values += [float(np.float32(scale) * m) for m in mids] + [float(-np.float32(scale) * m) for m in mids]
  values += [0.0, 1.0]
  values += [0.0] * (2**total_bits - len(values))
  return np.sort(np.asarray(values, np.float32))


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
  """Evenly spaced float32 points as PyTorch's linspace computes them (numpy's float64-then-round differs by an
  ulp): a float32 step, the first half start + step * i and the rest end - step * (steps - 1 - i), each product
  and sum rounded once (a fused multiply-add; exact in float64, then rounded)."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps)
  return np.where(i < steps // 2, np.float64(start32) + step * i,
                  np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)


DYNAMIC_MAP = dynamic_map()


def _nearest(scaled: jax.Array, levels: np.ndarray) -> jax.Array:
  """Index of the nearest of the sorted `levels` as uint8: the first level whose upper midpoint (float32) is >= the
  value, so a value exactly between two levels takes the lower one."""
  midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
  return jnp.searchsorted(jnp.asarray(midpoints), scaled, side='left').astype(jnp.uint8)


def _blockwise(values: jax.Array, block: int, levels: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(codes [n], absmax [ceil(n / block)]) of a flat float32 array; the last block may be partial."""
  n = values.shape[0]
  padded = jnp.pad(values, (0, -n % block)).reshape(-1, block)
  absmax = jnp.abs(padded).max(axis=-1)
  inverse = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)  # An all-zero block stays 0.
  scaled = jnp.clip(padded * inverse[:, None], -1.0, 1.0)
  return _nearest(scaled, levels).reshape(-1)[:n], absmax


def check_size(n: int, name: str) -> None:
  if n % BLOCK:
    raise ValueError(f'QLoRA cannot quantise {name!r}: its {n:,} values (per layer) do not divide into blocks of '
                     f'{BLOCK}; leave it out of adapter.quantize (a regex over parameter names).')


def quantize(x: jax.Array) -> dict[str, jax.Array]:
  """The NF4 storage of `x` (any shape, quantised as one flat tensor): {'nf4': uint8 [n/2], 'absmax': uint8
  [n/64], 'scale': float32 [ceil(n/64/256)], 'offset': float32 []}."""
  flat = jnp.asarray(x, jnp.float32).reshape(-1)
  check_size(flat.shape[0], 'tensor')
  codes, absmax = _blockwise(flat, BLOCK, NF4_LEVELS)
  packed = (codes[0::2] << 4) | codes[1::2]
  offset = absmax.mean()
  absmax_codes, scale = _blockwise(absmax - offset, SCALE_BLOCK, DYNAMIC_MAP)
  return {'nf4': packed, 'absmax': absmax_codes, 'scale': scale, 'offset': offset}


def is_shaped(shape) -> bool:
  """Whether a tensor of `shape` is stored in its own layout (see the module docstring)."""
  return len(shape) > 1 and shape[-1] % BLOCK == 0


def in_layout(stored: dict[str, jax.Array], shape) -> dict[str, jax.Array]:
  """`quantize`'s flat storage of a tensor of `shape` in its own layout when `is_shaped(shape)`, else as it is."""
  if not is_shaped(shape):
    return stored
  *lead, last = shape
  return {**stored, 'nf4': stored['nf4'].reshape(*lead, last // 2),
          'absmax': stored['absmax'].reshape(*lead, last // BLOCK)}


def _flat_index(shape) -> jax.Array:
  """The row-major flat index of every element of an array of `shape`, from per-axis iotas (elementwise, so it
  is computed shard by shard)."""
  index, stride = jnp.zeros(shape, jnp.int32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def dequantize_absmax(stored: dict[str, jax.Array]) -> jax.Array:
  """The float32 block absmaxes (flat [n/64], or [..., last/64] in layout) from their 8-bit codes, the scales of
  their blocks of 256 (in row-major order) and the offset."""
  codes = stored['absmax']
  scales = stored['scale'][_flat_index(codes.shape) // SCALE_BLOCK]
  return jnp.asarray(DYNAMIC_MAP)[codes] * scales + stored['offset']


def dequantize(stored: dict[str, jax.Array], shape, dtype=jnp.float32) -> jax.Array:
  """`quantize`'s inverse up to the rounding, flat or in layout: the values in `shape`, in `dtype`."""
  packed = stored['nf4']
  codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(*packed.shape[:-1], -1)
  values = jnp.asarray(NF4_LEVELS)[codes].reshape(*codes.shape[:-1], -1, BLOCK) * dequantize_absmax(stored)[..., None]
  return values.reshape(shape).astype(dtype)


def stored_bytes_per_value() -> float:
  return 0.5 + 1 / BLOCK + 4 / (BLOCK * SCALE_BLOCK)
