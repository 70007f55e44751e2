"""Adapters: what trains and what stays frozen, through the unchanged loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from models import vit
from train import adapters, loop, steps

FROZEN = r'(embedding|encoder/block_0)/.*'


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def test_freeze_splits_by_name_and_merges_back():
  params = {'embedding': {'kernel': 1}, 'encoder': {'block_0': {'w': 2}, 'block_1': {'w': 3}}, 'head': {'b': 4}}
  adapter = adapters.make_adapter({'name': 'freeze', 'params': FROZEN})
  trainable, base = adapter.split(params)
  assert _flat(trainable) == {'encoder/block_1/w': 3, 'head/b': 4}
  assert _flat(base) == {'embedding/kernel': 1, 'encoder/block_0/w': 2}
  assert adapter.merge(trainable, base) == params
  assert adapters.trainable_fraction(adapter, params) == 0.5


@pytest.mark.parametrize('adapter_config, message', [
    ({'name': 'lora2'}, "adapter.name='lora2' is unknown; choose one of"),
    ({'name': 'freeze'}, 'needs adapter.params'),
    ({'name': 'freeze', 'params': 'nothing/.*'}, 'matches no parameter'),
    ({'name': 'freeze', 'params': '.*'}, 'freezes every parameter'),
])
def test_bad_adapter_configs_are_one_line(adapter_config, message):
  with pytest.raises(ValueError, match=message):
    adapters.make_adapter(adapter_config).split({'a': {'kernel': 1}, 'b': {'kernel': 2}})


def test_frozen_parameters_stay_bitwise_and_get_no_optimizer_state(digits_dir, tmp_path, tiny_config):
  config = tiny_config(digits_dir, total_steps=4, **{'adapter.name': 'freeze', 'adapter.params': FROZEN})
  out = loop.train(config, str(tmp_path))
  # The model's own seeded init, computed here independently of the loop (compiled as every seeded init is).
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  model = vit.Model(**config.model)
  init = steps.jit_once(lambda k: model.init({'params': k, 'dropout': k}, jnp.zeros((1, 8, 8, 1))))
  initial = _flat(init(init_key)['params'])
  initial = {k: np.asarray(v.unbox() if hasattr(v, 'unbox') else v) for k, v in initial.items()}
  base, trainable = _flat(out['frozen']['base']), _flat(out['state']['trainable'])
  assert set(base) == {k for k in initial if k.startswith(('embedding/', 'encoder/block_0/'))}
  assert set(trainable) == set(initial) - set(base)
  for name, value in base.items():
    np.testing.assert_array_equal(value, initial[name], err_msg=name)
  assert all(not np.array_equal(trainable[n], initial[n]) for n in trainable if n.endswith('kernel'))
  # AdamW keeps two moments of the trainable parameters and nothing of the frozen ones.
  moments = sum(x.size for x in jax.tree.leaves(out['state']['opt_state']) if x.ndim)
  assert moments == 2 * sum(x.size for x in trainable.values())
