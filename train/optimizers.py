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
  """Linear warmup from 0 to base_learning_rate, then cosine / linear decay or constant.

  The warmup is `warmup_steps`, or `warmup_fraction` of total_steps (for runs whose length a budget decides).
  """
  c = schedule_config
  base, warmup = float(c['base_learning_rate']), int(c.get('warmup_steps', 0))
  if c.get('warmup_fraction'):
    if warmup:
      raise ValueError('schedule sets both warmup_steps and warmup_fraction; keep one.')
    warmup = round(float(c['warmup_fraction']) * total_steps)
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


def _fan_in_axes(ndim: int) -> tuple[int, ...] | None:
  """Axes over which one output unit's weights are summed: a unit is a slice along the last axis of a
  Dense (in, out) / (in, heads, head_dim) kernel or an HWIO conv kernel; a vector or scalar is one unit."""
  if ndim <= 1:
    return None
  if ndim in (2, 3):
    return (0,)
  if ndim == 4:
    return (0, 1, 2)
  raise ValueError(f'adaptive gradient clipping has no unit-wise norm for a rank-{ndim} parameter; '
                   'exclude it with optimizer.agc_exclude_params.')


def unitwise_norm(x: jax.Array) -> jax.Array:
  axes = _fan_in_axes(x.ndim)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=axes is not None))


def adaptive_grad_clip(clip: float, eps: float, mask) -> optax.GradientTransformation:
  """AGC (Brock et al. 2021): a unit's gradient G_i is scaled down to clip * max(||W_i||, eps) when
  larger; `mask` (a tree of bools like the params) says which parameters are clipped."""

  def update(updates, state, params):
    if params is None:
      raise ValueError('adaptive gradient clipping needs the parameters in update().')

    def clip_one(g, p, clipped):
      if not clipped:
        return g
      max_norm = clip * jnp.maximum(unitwise_norm(p), eps)
      g_norm = unitwise_norm(g)
      scaled = g * (max_norm / jnp.maximum(g_norm, 1e-6))
      return jnp.where(g_norm > max_norm, scaled, g).astype(g.dtype)

    return jax.tree.map(clip_one, updates, params, mask), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optimizer_config: Mapping[str, Any], schedule: optax.Schedule, params) -> optax.GradientTransformation:
  """Gradient clipping (global norm, adaptive) -> (coupled decay) -> optimizer, by config, over the trainable
  parameters (what stays frozen is the adapter's business: train/adapters.py)."""
  c = optimizer_config
  name = c['name']
  wd = float(c.get('weight_decay', 0.0) or 0.0)
  decay_mask = regex_mask(params, c.get('weight_decay_params', None)) if wd else None
  chain = []
  if c.get('grad_clip_norm'):
    chain.append(optax.clip_by_global_norm(float(c['grad_clip_norm'])))
  if c.get('agc_clip'):
    excluded = regex_mask(params, c.get('agc_exclude_params', None))
    chain.append(adaptive_grad_clip(float(c['agc_clip']), float(c.get('agc_eps', 1e-3)),
                                    jax.tree.map(lambda e: not e, excluded)))
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
  if c.get('frozen_params'):
    raise ValueError("optimizer.frozen_params moved: set config.adapter = dict(name='freeze', params=REGEX); "
                     'frozen parameters then get no gradient and no optimizer state.')
  return optax.chain(*chain)


def ema_decay_at(optimizer_config: Mapping[str, Any], step) -> jax.Array:
  """The EMA decay at `step`; with ema_warmup it is min(decay, (1 + t) / (10 + t))."""
  decay = jnp.float32(optimizer_config['ema_decay'])
  if optimizer_config.get('ema_warmup', False):
    t = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return decay


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
