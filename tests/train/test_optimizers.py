"""Schedules, name-regex masks, weight decay, freezing and EMA against their formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import adapters, optimizers

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


def test_warmup_fraction_scales_with_the_run_length():
  for total in (40, 400):
    schedule = optimizers.make_schedule({'base_learning_rate': 1.0, 'warmup_fraction': 0.05, 'decay': 'constant'},
                                        total)
    warmup = total // 20
    assert float(schedule(warmup // 2)) == pytest.approx(0.5) and float(schedule(warmup)) == 1.0
  with pytest.raises(ValueError, match='both warmup_steps and warmup_fraction'):
    optimizers.make_schedule({'base_learning_rate': 1.0, 'warmup_steps': 3, 'warmup_fraction': 0.1}, 100)


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
  # Freezing is the adapter's: the optimizer (and its clipping) sees the trainable parameters only.
  adapter = adapters.make_adapter({'name': 'freeze', 'params': r'encoder/.*'})
  trainable, frozen = adapter.split(PARAMS)
  config = {'name': 'sgd', 'momentum': 0.0, 'grad_clip_norm': 1.0}
  tx = optimizers.make_optimizer(config, lambda step: 1.0, trainable)
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  assert 'encoder' not in updates and jax.tree.leaves(frozen)
  # Clipping sees the gradients of the trained parameters only: head has 12 entries of 10.
  np.testing.assert_allclose(updates['head']['kernel'], -10.0 / math.sqrt(12 * 100), rtol=1e-5)
  with pytest.raises(ValueError, match=r"optimizer.frozen_params moved: set config.adapter = dict\(name='freeze'"):
    optimizers.make_optimizer({**config, 'frozen_params': r'encoder/.*'}, lambda step: 1.0, PARAMS)


def test_ema_decay_warmup_formula():
  config = {'ema_decay': 0.9999, 'ema_warmup': True}
  for t in (0, 1, 10, 1000, 10**6):
    np.testing.assert_allclose(optimizers.ema_decay_at(config, t), min(0.9999, (1 + t) / (10 + t)), rtol=1e-6)
  assert float(optimizers.ema_decay_at({'ema_decay': 0.99}, 0)) == pytest.approx(0.99)
  ema = optimizers.ema_update({'w': jnp.array(1.0)}, {'w': jnp.array(3.0)}, 0.75)
  np.testing.assert_allclose(ema['w'], 0.75 * 1.0 + 0.25 * 3.0)


def _numpy_agc(g, p, clip, eps):
  """Adaptive gradient clipping written out directly from the paper's formula, unit by unit."""
  g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
  if g.ndim <= 1:
    units = [(slice(None),)]
  else:
    units = [(..., i) for i in range(g.shape[-1])]
  out = g.copy()
  for u in units:
    g_norm = np.sqrt((g[u] ** 2).sum())
    max_norm = clip * max(np.sqrt((p[u] ** 2).sum()), eps)
    if g_norm > max_norm:
      out[u] = g[u] * max_norm / g_norm
  return out


def test_adaptive_grad_clip_matches_formula_and_excludes_classifier():
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 4, 6)).astype(np.float32),
                     'gain': rng.normal(size=(6,)).astype(np.float32)},
            'skip_gain': np.float32(0.0),
            'head': {'kernel': rng.normal(size=(6, 5)).astype(np.float32), 'bias': np.zeros(5, np.float32)}}
  grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)
  # Shrink some units' gradients so that both clipped and unclipped units occur.
  grads['conv']['kernel'][..., :3] *= 1e-3
  grads['head']['kernel'] *= 100.0
  config = {'name': 'sgd', 'momentum': 0.0, 'agc_clip': 0.01, 'agc_eps': 1e-3,
            'agc_exclude_params': r'head/kernel'}
  tx = optimizers.make_optimizer(config, lambda step: 1.0, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  clipped = jax.tree.map(lambda u: -np.asarray(u), updates)
  for path in (('conv', 'kernel'), ('conv', 'gain'), ('head', 'bias')):
    g, p, got = grads, params, clipped
    for k in path:
      g, p, got = g[k], p[k], got[k]
    np.testing.assert_allclose(got, _numpy_agc(g, p, 0.01, 1e-3), rtol=1e-5, atol=1e-9)
  # Units 0-2 of the conv kernel are under the bound (unchanged), units 3-5 over it (scaled down).
  np.testing.assert_array_equal(clipped['conv']['kernel'][..., :3], grads['conv']['kernel'][..., :3])
  assert not np.allclose(clipped['conv']['kernel'][..., 3:], grads['conv']['kernel'][..., 3:])
  # The zero skip gain is clipped to clip * eps; the excluded classifier weight passes through untouched.
  np.testing.assert_allclose(abs(clipped['skip_gain']), 0.01 * 1e-3, rtol=1e-5)
  np.testing.assert_array_equal(clipped['head']['kernel'], grads['head']['kernel'])


def test_agc_comes_before_coupled_weight_decay():
  params = {'w': jnp.full((2, 2), 2.0)}
  grads = {'w': jnp.full((2, 2), 100.0)}
  config = {'name': 'sgd', 'momentum': 0.0, 'agc_clip': 0.01, 'weight_decay': 0.5, 'weight_decay_params': '.*'}
  tx = optimizers.make_optimizer(config, lambda step: 1.0, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Each column: ||W_i|| = 2*sqrt(2), clipped gradient norm 0.01 * that; then + 0.5 * w.
  clipped = 100.0 * (0.01 * 2 * np.sqrt(2)) / (100.0 * np.sqrt(2))
  np.testing.assert_allclose(updates['w'], -(clipped + 0.5 * 2.0), rtol=1e-5)
