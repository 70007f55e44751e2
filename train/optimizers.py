"""Optimizers and learning-rate schedules from config, with parameters picked by name regexes.

A parameter's name is its '/'-joined path in the parameter tree, e.g. 'encoder/block_3/mlp/fc1/kernel'.
Regexes are matched against the whole name (re.fullmatch), so '.*/kernel' means "every kernel".
"""
from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax


def param_names(tree) -> Any:
  """A tree like `tree` whose leaves are the leaves' '/'-joined path names."""
  def name(path, _):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def regex_mask(tree, pattern: str | None) -> Any:
  """True where the parameter name fully matches `pattern` (None matches nothing)."""
  if pattern is None:
    return jax.tree.map(lambda _: False, tree)
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'bad parameter regex {pattern!r}: {e}; fix the pattern in the config.') from None
  return jax.tree.map(lambda n: compiled.fullmatch(n) is not None, param_names(tree))


def make_schedule(schedule_config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to base_learning_rate, then cosine / linear decay or constant."""
  c = schedule_config
  base, warmup = float(c['base_learning_rate']), int(c.get('warmup_steps', 0))
  end = float(c.get('end_learning_rate', 0.0))
  decay_steps = max(total_steps - warmup, 1)
  if warmup >= total_steps and total_steps > 0:
    raise ValueError(f'schedule.warmup_steps={warmup} is not below total_steps={total_steps}; shorten the warmup.')
  kind = c.get('decay', 'cosine')
  if kind == 'cosine':
    after = optax.cosine_decay_schedule(base, decay_steps, alpha=end / base if base else 0.0)
  elif kind == 'linear':
    after = optax.linear_schedule(base, end, decay_steps)
  elif kind == 'constant':
    after = optax.constant_schedule(base)
  else:
    raise ValueError(f'schedule.decay={kind!r} is unknown; use cosine, linear or constant.')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), after], [warmup])


def make_optimizer(optimizer_config: Mapping[str, Any], schedule: optax.Schedule, params) -> optax.GradientTransformation:
  """Gradient clipping -> (coupled decay) -> optimizer -> freezing, all chosen by the config."""
  c = optimizer_config
  name = c['name']
  wd = float(c.get('weight_decay', 0.0) or 0.0)
  decay_mask = regex_mask(params, c.get('weight_decay_params', None)) if wd else None
  chain = []
  if c.get('grad_clip_norm'):
    chain.append(optax.clip_by_global_norm(float(c['grad_clip_norm'])))
  if name == 'adamw':
    # Decoupled decay, scaled by the learning rate as in Loshchilov & Hutter.
    chain.append(optax.adamw(schedule, b1=c.get('b1', 0.9), b2=c.get('b2', 0.999), eps=c.get('eps', 1e-8),
                             weight_decay=wd, mask=decay_mask))
  elif name == 'sgd':
    if wd:  # Coupled decay: added to the gradient before momentum.
      chain.append(optax.add_decayed_weights(wd, mask=decay_mask))
    chain.append(optax.sgd(schedule, momentum=c.get('momentum', 0.9) or None, nesterov=bool(c.get('nesterov', True))))
  else:
    raise ValueError(f'optimizer.name={name!r} is unknown; use adamw or sgd.')
  tx = optax.chain(*chain)
  frozen = c.get('frozen_params', None)
  if frozen:
    labels = jax.tree.map(lambda f: 'frozen' if f else 'trained', regex_mask(params, frozen))
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx


def ema_decay_at(optimizer_config: Mapping[str, Any], step) -> jax.Array:
  """The EMA decay at `step`; with ema_warmup it is min(decay, (1 + t) / (10 + t))."""
  decay = jnp.float32(optimizer_config['ema_decay'])
  if optimizer_config.get('ema_warmup', False):
    t = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return decay


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
