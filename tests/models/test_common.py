"""Tests for models/common.py: the shared Projection, boxed initializers, layer stacking, sizes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import common

FAN_IN = functools.partial(nn.initializers.variance_scaling, 1.0, 'fan_in', 'truncated_normal')


@pytest.mark.parametrize('in_shape,axes', [((24,), ('embed', 'heads', None)),
                                            ((6, 4), ('heads', 'head_dim', 'embed', None))])
@pytest.mark.parametrize('use_bias,kernel_init', [(True, nn.initializers.xavier_uniform), (False, FAN_IN)])
def test_projection_params_and_output(in_shape, axes, use_bias, kernel_init):
  num_in, out_shape = len(in_shape), (3, 5)
  module = common.Projection(out_shape, axes, num_in, use_bias=use_bias, kernel_init=kernel_init)
  x = np.random.RandomState(0).normal(size=(2, 7, *in_shape)).astype(np.float32)
  variables = module.init({'params': jax.random.key(0)}, x)['params']
  assert set(variables) == ({'kernel', 'bias'} if use_bias else {'kernel'})
  assert variables['kernel'].names == axes
  params = nn.meta.unbox(variables)
  assert params['kernel'].shape == in_shape + out_shape

  # The kernel is drawn as kernel_init(in_axis=contracted axes, out_axis=output axes) draws it.
  class Bare(nn.Module):
    @nn.compact
    def __call__(self):
      init = kernel_init(in_axis=tuple(range(num_in)), out_axis=tuple(range(num_in, num_in + 2)))
      return self.param('kernel', init, in_shape + out_shape)

  np.testing.assert_array_equal(params['kernel'], Bare().init({'params': jax.random.key(0)})['params']['kernel'])
  want = np.tensordot(x, params['kernel'], axes=num_in)
  if use_bias:
    assert variables['bias'].names == axes[num_in:] and not np.any(params['bias'])
    params = {**params, 'bias': np.full(out_shape, 0.5, np.float32)}
    want = want + 0.5
  np.testing.assert_allclose(module.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


def test_boxed_names_the_axes():
  init = common.boxed(nn.initializers.ones, ('embed', None))
  value = init(jax.random.key(0), (2, 3))
  assert isinstance(value, nn.LogicallyPartitioned) and value.names == ('embed', None)
  np.testing.assert_array_equal(nn.meta.unbox(value), np.ones((2, 3)))


def test_stack_and_unstack_layers():
  tree = {'embed': np.zeros(2), 'layer_0': {'w': np.full((2, 3), 0.0)}, 'layer_1': {'w': np.full((2, 3), 1.0)},
          'norm': {'scale': np.ones(2)}}
  stacked = common.stack_layers(tree)
  assert list(stacked) == ['embed', 'norm', 'layers'] and stacked['layers']['w'].shape == (2, 2, 3)
  np.testing.assert_array_equal(stacked['layers']['w'][1], tree['layer_1']['w'])
  back = common.unstack_layers(stacked)
  assert list(back) == ['embed', 'norm', 'layer_0', 'layer_1']
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  assert tree.keys() == {'embed', 'layer_0', 'layer_1', 'norm'}  # the input is not modified

  blocks = {'block_0': {'w': jnp.ones(2)}, 'block_1': {'w': jnp.zeros(2)}, 'blocks_extra': 1}
  stacked = common.stack_layers(blocks, 'block_', 'blocks')
  assert set(stacked) == {'blocks_extra', 'blocks'} and isinstance(stacked['blocks']['w'], np.ndarray)
  assert set(common.unstack_layers(stacked, 'block_', 'blocks')) == {'blocks_extra', 'block_0', 'block_1'}
  with pytest.raises(ValueError, match='missing'):
    common.stack_layers({'layer_0': 1, 'layer_2': 2})
  with pytest.raises(ValueError, match='layer_0'):
    common.stack_layers({'embed': 1})


def test_pair_and_param_counts():
  assert common.pair(3) == (3, 3) and common.pair(np.int64(2)) == (2, 2) and common.pair([4, 5]) == (4, 5)
  model = nn.Dense(3)
  shapes = common.abstract_params(model, (1, 4))
  assert shapes['kernel'].shape == (4, 3) and isinstance(shapes['kernel'], jax.ShapeDtypeStruct)
  assert common.count_params(model, (1, 4)) == 15
