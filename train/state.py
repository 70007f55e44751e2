"""The train state and the frozen trees beside it.

state = {'step', 'trainable', 'opt_state'[, 'ema']}: what the step differentiates and updates, and what a
checkpoint holds (with the data position). `ema` is an exponential moving average of `trainable`, kept when
`optimizer.ema_decay` is set.

frozen = {name: parameter tree}: read by the step, never differentiated, donated or checkpointed, rebuilt
at every start (fresh or resumed) from the run's initial parameters: `base` is the adapter's frozen half;
other names are the trees the objective needs (`config.frozen`, e.g. reference='init').
"""
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import optax

from train import optimizers

BASE = 'base'


def create(trainable, tx: optax.GradientTransformation, use_ema: bool) -> dict[str, Any]:
  state = {'step': jnp.zeros((), jnp.int32), 'trainable': trainable, 'opt_state': tx.init(trainable)}
  if use_ema:
    state['ema'] = trainable
  return state


def advance(state, trainable, opt_state, optimizer_config: Mapping[str, Any]) -> dict[str, Any]:
  """The state after one update: step + 1, the new trainable parameters and optimizer state, EMA follows."""
  new = {'step': state['step'] + 1, 'trainable': trainable, 'opt_state': opt_state}
  if 'ema' in state:
    decay = optimizers.ema_decay_at(optimizer_config, state['step'])
    new['ema'] = optimizers.ema_update(state['ema'], trainable, decay)
  return new


def evaluated(state) -> Any:
  """The trainable parameters a run is evaluated, sampled and exported with: the EMA copy when kept."""
  return state['ema'] if 'ema' in state else state['trainable']


def evaluated_key(config) -> str:
  """The checkpoint key of the evaluated parameters of a run with `config` (for tools reading checkpoints)."""
  return 'ema' if (config.get('optimizer') or {}).get('ema_decay') else 'trainable'
