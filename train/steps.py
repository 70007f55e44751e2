"""The jitted, sharded functions of a run: state init, train step and eval step.

Built from (config, mesh, rules, model, task, example input); the loop and the benchmarks share them, so a
benchmark times exactly the step that trains. Call `build` under `jax.set_mesh(mesh)` and
`nn.logical_axis_rules(rules)`, and run the returned functions under the same contexts.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from train import optimizers, sharding


@dataclasses.dataclass(frozen=True)
class Steps:
  init: Callable[[jax.Array], Any]            # rng -> sharded state
  init_from_params: Callable[[Any], Any]      # given (e.g. imported) params -> sharded state
  train: Callable[[Any, Any, Any], tuple[Any, Any]]  # (state, global batch, lr) -> (state, metrics); donates state
  eval: Callable[[Any, Any], Any]             # (params, global batch) -> replicated sums
  abstract_state: Any
  state_shardings: Any
  batch_sharding: NamedSharding
  schedule: optax.Schedule
  learning_rates: np.ndarray  # schedule(step) for every step of the run; the train step's `lr` input
  init_key: jax.Array
  uses_ema: bool


def _unbox(boxed_abstract):
  """Strips the logical-axis boxes of abstract values (no sharding constraint on shapes)."""
  return jax.tree.map(lambda b: b.unbox(apply_constraint=False), boxed_abstract,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def build(config, mesh, rules, model, task, example) -> Steps:
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  use_ema = bool(config.optimizer.get('ema_decay'))
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)

  def init_params(rng):
    return model.init({'params': rng, 'dropout': rng}, example)['params']  # Models default to eval mode.

  boxed = jax.eval_shape(init_params, init_key)
  param_shardings = sharding.param_shardings(boxed, mesh, rules)
  abstract_params = _unbox(boxed)
  schedule = optimizers.make_schedule(config.schedule, config.total_steps)
  # The learning rate enters the step as an input, not as the schedule's formula: the compiled step then
  # does not depend on the run's length, and one compilation (XLA's persistent cache) serves every budget
  # of a sweep. The optimizer state is the same either way (a schedule callable keeps its step count).
  tx_for = lambda lr: optimizers.make_optimizer(config.optimizer, lambda count: lr, abstract_params)
  tx = tx_for(0.0)
  learning_rates = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(config.total_steps + 1)))

  def state_from(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    if use_ema:
      state['ema_params'] = params
    return state

  def init_state(rng):
    return state_from(nn.unbox(init_params(rng)))  # Under the mesh: constrains each to its logical sharding.

  abstract_state = jax.eval_shape(init_state, init_key)
  state_shardings = {'step': replicated, 'params': param_shardings,
                     'opt_state': sharding.like_params(abstract_state['opt_state'], abstract_params,
                                                       param_shardings, mesh)}
  if use_ema:
    state_shardings['ema_params'] = param_shardings

  def train_step(state, batch, learning_rate):
    step = state['step']
    rng = jax.random.fold_in(step_key, step)  # Per-step randomness from (seed, step): resumes draw the same.
    grad_fn = jax.value_and_grad(lambda p: task.loss(model, p, batch, rng, train=True), has_aux=True)
    (loss, aux), grads = grad_fn(state['params'])
    updates, opt_state = tx_for(learning_rate).update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {'step': step + 1, 'params': params, 'opt_state': opt_state}
    if use_ema:
      decay = optimizers.ema_decay_at(config.optimizer, step)
      new_state['ema_params'] = optimizers.ema_update(state['ema_params'], params, decay)
    metrics = {'train/loss': loss, 'train/learning_rate': learning_rate,
               'train/grad_norm': optax.tree.norm(grads), 'train/param_norm': optax.tree.norm(params), **aux}
    return new_state, metrics

  return Steps(
      init=jax.jit(init_state, out_shardings=state_shardings),
      init_from_params=jax.jit(state_from, in_shardings=(param_shardings,), out_shardings=state_shardings),
      train=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval=jax.jit(lambda params, batch: task.eval_sums(model, params, batch),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=replicated),
      abstract_state=abstract_state, state_shardings=state_shardings, batch_sharding=batch_sharding,
      schedule=schedule, learning_rates=learning_rates, init_key=init_key, uses_ema=use_ema)
