"""Helpers that several models share (nothing here knows of a particular model)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def abstract_params(model: nn.Module, input_shape: tuple[int, ...], dtype=jnp.float32):
  """Unboxed ShapeDtypeStructs of `model`'s parameters on an input of `input_shape` (jax.eval_shape: no memory)."""
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, jnp.zeros(input_shape, dtype)))
  return nn.meta.unbox(shapes['params'])


def count_params(model: nn.Module, input_shape: tuple[int, ...], dtype=jnp.float32) -> int:
  """Number of parameters of `model` on an input of `input_shape`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(model, input_shape, dtype)))
