"""Frozen trees an objective needs: provided by config.frozen, never checkpointed, rebuilt on resume."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import loop, objectives, steps


class AnchoredClassification(objectives.Classification):
  """A toy objective with a frozen reference: cross-entropy plus an L2 pull towards the reference parameters."""
  frozen_needs = ('reference',)

  def loss(self, model, params, frozen, batch, rng, train):
    loss_sum, sums = super().loss(model, params, frozen, batch, rng, train)
    pull = sum(jnp.sum((p - r) ** 2) for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(frozen['reference'])))
    return loss_sum + 10.0 * pull * sums['weight'], sums


@pytest.fixture
def anchored(monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, 'anchored', AnchoredClassification)


def test_objective_with_a_frozen_reference_trains_and_resumes_exactly(anchored, digits_dir, tmp_path, tiny_config):
  config = tiny_config(digits_dir, total_steps=4, checkpoint_every_steps=2, **{'task.name': 'anchored'})
  config.frozen = {'reference': 'init'}
  straight = loop.train(config, str(tmp_path / 'straight'))
  reference = jax.device_get(straight['frozen']['reference'])
  # The reference is the initial parameters, kept bitwise through training (never donated or updated).
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  model = loop.build_model(config)
  init = steps.jit_once(lambda k: model.init({'params': k, 'dropout': k}, jnp.zeros((1, 8, 8, 1))))
  initial = jax.device_get(init(init_key))
  jax.tree.map(np.testing.assert_array_equal, reference, jax.tree.map(lambda b: b.unbox(), initial['params'],
                                                                    is_leaf=lambda b: hasattr(b, 'unbox')))
  # Not in the checkpoint: only step, trainable parameters and optimizer state.
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(str(tmp_path / 'straight' / 'checkpoints' / '4' / 'state')).item_metadata.tree
  assert set(stored) == {'step', 'trainable', 'opt_state'}
  # As if killed after step 2: the resumed run rebuilds the reference and ends bitwise equal.
  shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '4')
  resumed = loop.train(config, str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed['state']['trainable']),
               jax.device_get(straight['state']['trainable']))


def test_a_needed_frozen_tree_missing_from_the_config_is_one_line(anchored, digits_dir, tmp_path, tiny_config):
  config = tiny_config(digits_dir, **{'task.name': 'anchored'})
  with pytest.raises(ValueError, match=r"the 'anchored' objective needs the frozen tree 'reference'; set "
                                       r"config.frozen.reference='init'"):
    loop.train(config, str(tmp_path))
