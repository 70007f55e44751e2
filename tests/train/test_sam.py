"""SAM in the shared train step, against Foret et al.'s update written out in numpy on a known quadratic.

The loss of a batch is the mean over its rows of 0.5 (w - c_i)^T A (w - c_i), plus w . z with z a normal draw
from the step's rng (the stand-in for dropout): its gradient is A (w - mean c) + z. SAM's update from w0 is
w1 = w0 - lr * (A (w0 + e - mean c) + z), e = rho g / ||g||_2, g = A (w0 - mean c) + z, and only holds if the
ascent gradient sees the same rows and the same rng as the gradient at w0.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from train import adapters, loop, sharding, steps

DIM, BATCH, LR = 5, 8, 0.1
_rng = np.random.default_rng(0)
_M = _rng.standard_normal((DIM, DIM))
A = (_M @ _M.T / DIM + 0.5 * np.eye(DIM)).astype(np.float32)  # Symmetric positive definite.
W0 = _rng.standard_normal(DIM).astype(np.float32)
CENTRES = (_rng.standard_normal((BATCH, DIM)) + 1.0).astype(np.float32)


class Shift(nn.Module):
  """w - c for each row c: the model whose single parameter vector is w."""

  @nn.compact
  def __call__(self, c):
    # Boxed like every model's parameters (replicated: no logical axis name).
    w = self.param('w', nn.with_logical_partitioning(lambda key, shape: jnp.asarray(W0), (None,)), (DIM,))
    return w[None] - c


class Quadratic:
  """The test's objective, in the interface of train/objectives.py (summed loss and additive sums)."""
  frozen_needs = ()

  def __init__(self, noise: float):
    self.noise = noise

  def example_input(self, batch):
    return batch['c'][:1]

  def loss(self, model, params, frozen, batch, rng, train):
    d = model.apply({'params': params}, batch['c'])
    weight = jnp.float32(d.shape[0])
    z = self.noise * jax.random.normal(rng, (DIM,))
    loss_sum = 0.5 * jnp.einsum('bi,ij,bj->', d, jnp.asarray(A), d) + weight * params['w'] @ z
    return loss_sum, {'weight': weight, 'z': weight * z}

  def train_summary(self, sums):
    return {'train/z': sums['z'] / sums['weight']}


def _config(rho, microbatches=1, **optimizer):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 2
  c.microbatches = microbatches
  c.mesh = dict(data=2, fsdp=1, tensor=1)
  c.schedule = dict(base_learning_rate=LR, decay='constant', warmup_steps=0)
  c.optimizer = dict(name='sgd', momentum=0.0, sam_rho=rho, **optimizer)
  return c


def _train(config, noise, num_steps):
  """(w after each step, each step's metrics) of the real step on 2 devices."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  objective = Quadratic(noise)
  batch = {'c': CENTRES}
  with jax.set_mesh(mesh), nn.logical_axis_rules(()):
    fns = steps.build(config, mesh, (), Shift(), objective, adapters.make_adapter(None), batch['c'][:1])
    state, _ = fns.init(fns.init_key)
    ws, metrics = [], []
    for step in range(num_steps):
      state, m = fns.train(state, {}, sharding.global_batch(batch, fns.batch_sharding), fns.learning_rates[step])
      ws.append(np.asarray(state['trainable']['w'], np.float64))
      metrics.append(jax.device_get(m))
  return ws, metrics


def _loss(w, z):
  d = w[None] - CENTRES.astype(np.float64)
  return float(np.mean(0.5 * np.einsum('bi,ij,bj->b', d, A, d)) + w @ z)


def _sam_step(w, z, rho, clip=None, weight_decay=0.0):
  """Foret et al.'s step from w in float64: gradient at the ascent point, then the plain SGD update."""
  grad = lambda v: A.astype(np.float64) @ (v - CENTRES.mean(0)) + z
  g = grad(w)
  ascent = w + rho * g / np.linalg.norm(g)
  g_sam = grad(ascent)
  if clip is not None:
    g_sam = g_sam * min(1.0, clip / np.linalg.norm(g_sam))
  return w - LR * (g_sam + weight_decay * w), _loss(ascent, z)


@pytest.mark.parametrize('noise', [0.0, 1.0], ids=['exact', 'with_rng'])
def test_two_sam_steps_follow_the_formula(noise):
  ws, metrics = _train(_config(rho=0.3), noise, num_steps=2)
  w = W0.astype(np.float64)
  for step in range(2):
    z = np.asarray(metrics[step]['train/z'], np.float64)  # The rng draw of this step (0 without noise).
    if not noise:
      assert not z.any()
    expected, ascent_loss = _sam_step(w, z, rho=0.3)
    np.testing.assert_allclose(ws[step], expected, rtol=1e-5, atol=1e-6)
    # train/loss is the loss at w, not at the ascent point.
    assert metrics[step]['train/loss'] == pytest.approx(_loss(w, z), rel=1e-5)
    assert metrics[step]['train/sam_ascent_loss'] == pytest.approx(ascent_loss, rel=1e-5)
    assert ascent_loss > _loss(w, z)
    w = ws[step]


def test_sam_moves_w_differently_from_plain_sgd():
  (w_sam,), _ = _train(_config(rho=0.3), 0.0, num_steps=1)
  (w_plain,), metrics = _train(_config(rho=None), 0.0, num_steps=1)
  assert 'train/sam_ascent_loss' not in metrics[0]
  np.testing.assert_allclose(w_plain, W0 - LR * A @ (W0 - CENTRES.mean(0)), rtol=1e-5, atol=1e-6)
  assert np.abs(w_sam - w_plain).max() > 1e-2


def test_clipping_and_weight_decay_act_on_the_sam_gradient():
  ws, _ = _train(_config(rho=0.3, grad_clip_norm=0.5, weight_decay=0.1, weight_decay_params='.*'), 0.0, 1)
  expected, _ = _sam_step(W0.astype(np.float64), np.zeros(DIM), rho=0.3, clip=0.5, weight_decay=0.1)
  np.testing.assert_allclose(ws[0], expected, rtol=1e-5, atol=1e-6)


def test_microbatches_give_the_same_sam_steps():
  one, m1 = _train(_config(rho=0.3, microbatches=1), 0.0, num_steps=2)
  two, m2 = _train(_config(rho=0.3, microbatches=2), 0.0, num_steps=2)
  for a, b, ma, mb in zip(one, two, m1, m2):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert mb['train/sam_ascent_loss'] == pytest.approx(float(ma['train/sam_ascent_loss']), rel=1e-6)


def test_a_zero_gradient_takes_no_ascent_instead_of_nan():
  w = {'w': jnp.asarray(W0)}
  np.testing.assert_array_equal(steps.ascent_point(w, {'w': jnp.zeros(DIM)}, rho=0.05)['w'], W0)
  # A zero gradient at w: the second pass is at w too, and gives the same loss.
  loss, _, ascent_loss, _ = steps.sam_loss_and_grads(lambda p: (jnp.sum(p['w']), {}, {'w': jnp.zeros(DIM)}), w,
                                                     rho=0.05)
  assert loss == ascent_loss == np.float32(W0.sum())


@pytest.mark.parametrize('rho', [-0.1, 'big', True])
def test_bad_sam_rho_is_a_one_line_error(tiny_config, rho):
  config = tiny_config(None, **{'optimizer.sam_rho': rho})
  with pytest.raises(ValueError, match=r'optimizer.sam_rho=.* must be >= 0; set --config.optimizer.sam_rho') as e:
    loop.check_config(config, num_devices=1, process_count=1)
  assert '\n' not in str(e.value)
