"""Helpers and blocks that several models share (nothing here knows of a particular model).

- `abstract_params`, `count_params`: parameter shapes and counts without computing anything.
- `pair`: (h, w) from an int or a pair.
- `boxed`: an initializer whose parameter carries logical axis names (for sharding rules).
- `Projection`: `x @ kernel (+ bias)` contracting several axes, with its kernel init chosen by the model.
- `stack_layers`, `unstack_layers`: unrolled `<prefix>{i}` layer params <-> one stacked entry (nn.scan).
"""
from collections.abc import Callable, Mapping, Sequence
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
Pair = int | Sequence[int]


def pair(x: Pair) -> tuple[int, int]:
  """(x, x) for an int, else the first two entries of x as ints (image / patch / grid sizes)."""
  return (int(x), int(x)) if isinstance(x, (int, np.integer)) else (int(x[0]), int(x[1]))


def abstract_params(model: nn.Module, input_shape: tuple[int, ...], dtype=jnp.float32):
  """Unboxed ShapeDtypeStructs of `model`'s parameters on an input of `input_shape` (jax.eval_shape: no memory)."""
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, jnp.zeros(input_shape, dtype)))
  return nn.meta.unbox(shapes['params'])


def count_params(model: nn.Module, input_shape: tuple[int, ...], dtype=jnp.float32) -> int:
  """Number of parameters of `model` on an input of `input_shape`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(model, input_shape, dtype)))


def boxed(init: Callable, names: tuple[str | None, ...]) -> Callable:
  """`init` whose parameters are boxed with the logical axis `names` (one per dimension)."""
  return nn.with_logical_partitioning(init, names)


class Projection(nn.Module):
  """`x @ kernel (+ bias)` contracting the last `num_in` axes of x with kernel[in..., out...].

  Used instead of nn.DenseGeneral, whose flat-then-reshape initialisation applies the
  (n-D) logical sharding constraint to a 2-D array and fails under an active mesh.
  `kernel_init` is an initializer factory called with `in_axis` / `out_axis` (the
  contracted and the output axes of the kernel), such as nn.initializers.xavier_uniform
  (the default) or functools.partial(nn.initializers.variance_scaling, 1.0, 'fan_in',
  'truncated_normal'). The bias, if any, starts at zero and has the output axes' names.
  Parameters: 'kernel' [in..., out...], then 'bias' [out...] when use_bias.
  """
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  num_in: int = 1
  dtype: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Callable[..., Callable] = nn.initializers.xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.num_in, len(self.out_shape)
    init = self.kernel_init(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param('kernel', boxed(init, self.kernel_axes),
                        tuple(x.shape[-n_in:]) + tuple(self.out_shape))
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
    if self.use_bias:
      bias = self.param('bias', boxed(nn.initializers.zeros, self.kernel_axes[n_in:]),
                        tuple(self.out_shape))
      y = y + bias.astype(self.dtype)
    return y


def _layer_keys(tree: Mapping[str, Any], prefix: str) -> list[str]:
  pattern = re.compile(re.escape(prefix) + r'\d+')
  n = sum(bool(pattern.fullmatch(k)) for k in tree)
  keys = [f'{prefix}{i}' for i in range(n)]
  missing = [k for k in keys if k not in tree]
  if not n or missing:
    raise ValueError(f'expected layers {prefix}0..{prefix}{max(n - 1, 0)} in {sorted(tree)}'
                     + (f'; missing {missing}' if missing else ''))
  return keys


def stack_layers(tree: Mapping[str, Any], prefix: str = 'layer_', stacked: str = 'layers') -> Params:
  """Unrolled layers `{prefix}0..{prefix}{n-1}` of `tree` -> one entry `stacked` (numpy, stacked on axis 0).

  This is the scan=False -> scan=True parameter layout of nn.scan over the layers; other
  entries of `tree` are kept as they are (the stacked entry comes last).
  """
  tree = dict(tree)
  layers = [tree.pop(k) for k in _layer_keys(tree, prefix)]
  tree[stacked] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return tree


def unstack_layers(tree: Mapping[str, Any], prefix: str = 'layer_', stacked: str = 'layers') -> Params:
  """Inverse of `stack_layers`: entry `stacked` [n, ...] -> `{prefix}0..{prefix}{n-1}` (numpy)."""
  tree = dict(tree)
  layers = tree.pop(stacked)
  for i in range(jax.tree.leaves(layers)[0].shape[0]):
    tree[f'{prefix}{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), layers)
  return tree
