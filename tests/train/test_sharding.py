"""Mesh resolution, logical rules and sharding of parameter-like trees."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

from train import sharding


@pytest.mark.parametrize('config, shape', [
    ({'data': -1, 'fsdp': 1, 'tensor': 1}, (8, 1, 1, 1)),  # 'sequence' left out: 1
    ({'data': 2, 'fsdp': -1, 'tensor': 2}, (2, 2, 1, 2)),
    ({'data': 2, 'fsdp': 4, 'tensor': 1}, (2, 4, 1, 1)),
    ({'data': 2, 'fsdp': 1, 'sequence': -1, 'tensor': 1}, (2, 1, 4, 1)),
])
def test_mesh_shape_resolves_minus_one(config, shape):
  assert sharding.mesh_shape(config, 8) == shape


@pytest.mark.parametrize('config, message', [
    ({'data': 2, 'fsdp': 3, 'tensor': 1}, 'data=2 x fsdp=3 x tensor=1 = 6 devices, but 8 are available'),
    ({'data': 3, 'fsdp': -1, 'tensor': 1}, 'do not divide the 8 devices'),
    ({'data': -1, 'fsdp': -1, 'tensor': 1}, 'at most one axis may be -1'),
    ({'data': 2, 'fsdp': 1, 'sequence': 2, 'tensor': 1}, 'data=2 x fsdp=1 x sequence=2 x tensor=1 = 4 devices'),
    ({'data': 2, 'tensor': 1}, "config.mesh has no 'fsdp' axis"),
])
def test_mesh_that_does_not_fit_is_one_clear_line(config, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding.mesh_shape(config, 8)
  assert '\n' not in str(e.value)


def test_rules_reject_unknown_mesh_axis():
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    sharding.logical_rules({'embed': 'model'})
  assert sharding.logical_rules({'embed': 'fsdp', 'batch': ['data', 'fsdp'], 'mlp': None}) == (
      ('embed', 'fsdp'), ('batch', ('data', 'fsdp')), ('mlp', None))


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.ones, ('embed', 'mlp')), (8, 4))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)), (4,))
    return x @ kernel + bias


def test_param_and_optimizer_state_shardings_follow_rules():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.logical_rules({'embed': 'fsdp', 'mlp': 'tensor'})
  boxed = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.ones((1, 8)))['params']
  shardings = sharding.param_shardings(boxed, mesh, rules)
  assert shardings['kernel'].spec == P('fsdp', 'tensor')
  assert shardings['bias'].spec == P('tensor')
  # Adam's moments mirror the parameters and take their shardings; the step count is replicated.
  import optax
  params = nn.unbox(boxed)
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  opt_shardings = sharding.like_params(opt_state, params, shardings, mesh)
  assert opt_shardings[0].mu['kernel'].spec == P('fsdp', 'tensor')
  assert opt_shardings[0].nu['bias'].spec == P('tensor')
  assert opt_shardings[0].count.spec == P()


def test_param_axis_without_rule_is_one_clear_line():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  boxed = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.ones((1, 8)))['params']
  with pytest.raises(ValueError, match=r"logical axes \['mlp'\] that have no entry in sharding_rules"):
    sharding.param_shardings(boxed, mesh, sharding.logical_rules({'embed': 'fsdp'}))


def test_rules_in_config_string_form():
  assert sharding.logical_rules({'batch': 'data,fsdp', 'embed': 'fsdp', 'mlp': ''}) == (
      ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', None))
