"""Schedules, name-regex masks, weight decay, freezing and EMA against their formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import optimizers

PARAMS = {'encoder': {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}},
          'head': {'kernel': jnp.ones((2, 4)), 'bias': jnp.ones((4,))}}


def test_warmup_then_cosine_matches_formula():
  schedule = optimizers.make_schedule({'base_learning_rate': 0.4, 'warmup_steps': 10, 'decay': 'cosine'}, 110)
  for step in (0, 5, 10):
    np.testing.assert_allclose(schedule(step), 0.4 * step / 10, rtol=1e-6)
  for step in (10, 35, 60, 109, 110):
    expected = 0.4 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-7)


def test_linear_and_constant_decay():
  linear = optimizers.make_schedule({'base_learning_rate': 1.0, 'warmup_steps': 0, 'decay': 'linear'}, 100)
  np.testing.assert_allclose([linear(0), linear(25), linear(100)], [1.0, 0.75, 0.0], atol=1e-6)
  constant = optimizers.make_schedule({'base_learning_rate': 0.3, 'warmup_steps': 4, 'decay': 'constant'}, 100)
  np.testing.assert_allclose([constant(2), constant(4), constant(99)], [0.15, 0.3, 0.3], rtol=1e-6)
  with pytest.raises(ValueError, match='schedule.decay'):
    optimizers.make_schedule({'base_learning_rate': 1.0, 'decay': 'exp'}, 10)


def test_regex_mask_selects_by_full_name():
  mask = optimizers.regex_mask(PARAMS, r'.*kernel')
  assert mask == {'encoder': {'dense': {'kernel': True, 'bias': False}}, 'head': {'kernel': True, 'bias': False}}
  assert optimizers.regex_mask(PARAMS, r'head/.*')['encoder']['dense']['kernel'] is False
  with pytest.raises(ValueError, match='bad parameter regex'):
    optimizers.regex_mask(PARAMS, '(')


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_weight_decay_only_on_masked_params(name):
  config = {'name': name, 'weight_decay': 0.1, 'weight_decay_params': r'.*kernel', 'momentum': 0.0}
  tx = optimizers.make_optimizer(config, lambda step: 0.5, PARAMS)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
  # With a zero gradient only the decay moves a parameter: -lr * wd * p, for both coupled and decoupled decay.
  np.testing.assert_allclose(updates['head']['kernel'], -0.5 * 0.1 * np.ones((2, 4)), rtol=1e-6)
  np.testing.assert_array_equal(updates['head']['bias'], 0.0)
  np.testing.assert_array_equal(updates['encoder']['dense']['bias'], 0.0)


def test_sgd_nesterov_matches_formula():
  config = {'name': 'sgd', 'momentum': 0.9, 'nesterov': True}
  tx = optimizers.make_optimizer(config, lambda step: 0.1, PARAMS)
  grads = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), PARAMS)
  state = tx.init(PARAMS)
  _, state = tx.update(grads, state, PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  # Nesterov: trace_t = g + mu * trace_{t-1}; update = -lr * (g + mu * trace_t).
  trace2 = 2.0 + 0.9 * 2.0
  np.testing.assert_allclose(updates['head']['bias'], -0.1 * (2.0 + 0.9 * trace2), rtol=1e-6)


def test_gradient_clipping_and_freezing():
  config = {'name': 'sgd', 'momentum': 0.0, 'grad_clip_norm': 1.0, 'frozen_params': r'encoder/.*'}
  tx = optimizers.make_optimizer(config, lambda step: 1.0, PARAMS)
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(updates['encoder']['dense']['kernel'], 0.0)
  # Clipping sees the gradients of the trained parameters only: head has 12 entries of 10.
  np.testing.assert_allclose(updates['head']['kernel'], -10.0 / math.sqrt(12 * 100), rtol=1e-5)


def test_ema_decay_warmup_formula():
  config = {'ema_decay': 0.9999, 'ema_warmup': True}
  for t in (0, 1, 10, 1000, 10**6):
    np.testing.assert_allclose(optimizers.ema_decay_at(config, t), min(0.9999, (1 + t) / (10 + t)), rtol=1e-6)
  assert float(optimizers.ema_decay_at({'ema_decay': 0.99}, 0)) == pytest.approx(0.99)
  ema = optimizers.ema_update({'w': jnp.array(1.0)}, {'w': jnp.array(3.0)}, 0.75)
  np.testing.assert_allclose(ema['w'], 0.75 * 1.0 + 0.25 * 3.0)
