r"""Times sliding-window attention per token: the blockwise path against the masked [t, t] path.

At a fixed window W the blockwise path's cost per token stays flat as the sequence grows, while the
masked path's grows with the length. Prints microseconds per token for lengths W, 4W and 16W.

  python -m benchmarks.attention --window=256 --block_size=256 --num_heads=8 --num_kv_heads=2 --head_dim=64
"""
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from models import mistral

_WINDOW = flags.DEFINE_integer('window', 256, 'Sliding window W.')
_BLOCK = flags.DEFINE_integer('block_size', 256, 'Query/key block of the blockwise path.')
_HEADS = flags.DEFINE_integer('num_heads', 8, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('num_kv_heads', 2, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Per-head dimension.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Sequences per call.')
_MULTIPLES = flags.DEFINE_list('multiples', ['1', '4', '16'], 'Lengths as multiples of the window.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls (median) after one compile call.')


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  w, kv, group = _WINDOW.value, _KV_HEADS.value, _HEADS.value // _KV_HEADS.value
  print(f'device: {jax.devices()[0].device_kind} | W={w} block={_BLOCK.value} heads={_HEADS.value} '
        f'kv_heads={kv} head_dim={_HEAD_DIM.value} batch={_BATCH.value} float32')
  for multiple in map(int, _MULTIPLES.value):
    t = w * multiple
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (_BATCH.value, t, kv, group, _HEAD_DIM.value), jnp.float32)
    k = jax.random.normal(keys[1], (_BATCH.value, t, kv, _HEAD_DIM.value), jnp.float32)
    v = jax.random.normal(keys[2], (_BATCH.value, t, kv, _HEAD_DIM.value), jnp.float32)
    segments = jnp.ones((_BATCH.value, t), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t), (_BATCH.value, t))
    blockwise = jax.jit(lambda *a: mistral.blockwise_attention(*a, w, _BLOCK.value))
    masked = jax.jit(lambda *a: mistral.masked_attention(*a, w))
    args = (q, k, v, segments, positions)
    diff = float(jnp.abs(blockwise(*args) - masked(*args)).max())
    tokens = _BATCH.value * t
    tb, tm = _time(blockwise, *args), _time(masked, *args)
    print(f'length {t:6d} ({multiple:2d}W) | blockwise {1e6 * tb / tokens:8.2f} us/token | '
          f'masked {1e6 * tm / tokens:8.2f} us/token | masked/blockwise {tm / tb:5.2f}x | max |diff| {diff:.1e}')


if __name__ == '__main__':
  app.run(main)
