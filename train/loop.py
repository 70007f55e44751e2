"""The training loop: config -> mesh and rules -> sharded state -> jitted steps -> metrics, eval, checkpoints.

It knows no particular model or task: `config.model_name` names a module under models/ (its `Model` class is
built with `config.model`), `config.task.name` a task in train/tasks.py, `config.data` an input pipeline.
"""
import importlib
import pkgutil
import signal
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from data import pipeline
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import optimizers, sharding, tasks

REQUIRED_FIELDS = ('model_name', 'model', 'task', 'batch_size', 'total_steps', 'seed', 'log_every_steps',
                   'eval_every_steps', 'checkpoint_every_steps', 'mesh', 'optimizer', 'schedule', 'data',
                   'sharding_rules')


def build_model(config):
  """models.<model_name>.Model(**config.model)."""
  import models
  available = sorted(m.name for m in pkgutil.iter_modules(models.__path__))
  if config.model_name not in available:
    raise ValueError(f'model_name={config.model_name!r} is not a module under models/; choose one of {available}.')
  module = importlib.import_module(f'models.{config.model_name}')
  kwargs = config.model.to_dict() if isinstance(config.model, ml_collections.ConfigDict) else dict(config.model)
  try:
    return module.Model(**kwargs)
  except TypeError as e:
    raise ValueError(f'config.model does not fit models.{config.model_name}.Model: {e}') from None


def check_config(config, num_devices: int, process_count: int) -> tuple[int, ...]:
  """Fails fast, with one line, on what would otherwise fail deep inside the run."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f'config lacks fields {missing}; every config sets {list(REQUIRED_FIELDS)}.')
  if config.total_steps <= 0:
    raise ValueError(f'total_steps={config.total_steps} must be positive.')
  shape = sharding.mesh_shape(config.mesh, num_devices)
  data_parallel = shape[0] * shape[1]
  for name in ('batch_size', 'eval_batch_size'):
    size = config.get(name) or config.batch_size
    if size % data_parallel:
      raise ValueError(f'{name}={size} is not divisible by the data-parallel size data*fsdp={data_parallel}; '
                       f'use a multiple of {data_parallel}.')
    if size % process_count:
      raise ValueError(f'{name}={size} is not divisible by the {process_count} processes.')
  return shape


class _StopFlag:
  """Set by SIGTERM (a preemption notice); the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  pass


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` on `devices` (default: all).

  Returns {'step', 'preempted', 'eval', 'state'}.
  """
  devices = jax.devices() if devices is None else list(devices)
  process_index, process_count = jax.process_index(), jax.process_count()
  check_config(config, len(devices), process_count)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.sharding_rules)
  model = build_model(config)
  task = tasks.make_task(config.task)
  eval_batch_size = config.get('eval_batch_size') or config.batch_size

  train_iter = pipeline.make_train_iter(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                        process_index=process_index, process_count=process_count)
  eval_batches, num_eval = pipeline.make_eval_iter(config.data, global_batch_size=eval_batch_size,
                                                   process_index=process_index, process_count=process_count)
  example = task.example_input(next(iter(eval_batches())))

  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  use_ema = bool(config.optimizer.get('ema_decay'))
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)
  writer = metrics_lib.MetricWriter(workdir, enabled=process_index == 0)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.get('checkpoints_to_keep', 3))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    def init_params(rng):
      return model.init({'params': rng, 'dropout': rng}, example, train=False)['params']

    boxed = jax.eval_shape(init_params, init_key)
    param_shardings = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = nn.unbox(boxed)
    schedule = optimizers.make_schedule(config.schedule, config.total_steps)
    tx = optimizers.make_optimizer(config.optimizer, schedule, abstract_params)

    def init_state(rng):
      params = nn.unbox(init_params(rng))
      state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
      if use_ema:
        state['ema_params'] = params
      return state

    abstract_state = jax.eval_shape(init_state, init_key)
    state_shardings = {'step': replicated, 'params': param_shardings,
                       'opt_state': sharding.like_params(abstract_state['opt_state'], abstract_params,
                                                         param_shardings, mesh)}
    if use_ema:
      state_shardings['ema_params'] = param_shardings

    def train_step(state, batch):
      step = state['step']
      rng = jax.random.fold_in(step_key, step)
      grad_fn = jax.value_and_grad(lambda p: task.loss(model, p, batch, rng, train=True), has_aux=True)
      (loss, aux), grads = grad_fn(state['params'])
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      new_state = {'step': step + 1, 'params': params, 'opt_state': opt_state}
      if use_ema:
        decay = optimizers.ema_decay_at(config.optimizer, step)
        new_state['ema_params'] = optimizers.ema_update(state['ema_params'], params, decay)
      metrics = {'train/loss': loss, 'train/learning_rate': schedule(step),
                 'train/grad_norm': optax.global_norm(grads), 'train/param_norm': optax.global_norm(params), **aux}
      return new_state, metrics

    p_train_step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
    p_eval_step = jax.jit(lambda params, batch: task.eval_sums(model, params, batch),
                          in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

    def evaluate(params) -> dict[str, float]:
      sums = None
      for local in eval_batches():
        out = p_eval_step(params, sharding.global_batch(local, batch_sharding))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      sums = jax.tree.map(lambda x: float(np.asarray(x, np.float64)), jax.device_get(sums))
      if int(sums['count']) != num_eval:
        raise RuntimeError(f'evaluation saw {int(sums["count"])} examples, expected {num_eval}.')
      return task.eval_summary(sums)

    latest = checkpointer.latest_step()
    if latest is None:
      state = jax.jit(init_state, out_shardings=state_shardings)(init_key)
      meta = {'core_hours': 0.0}
    else:
      target = checkpoint_lib.abstract_with_shardings(abstract_state, state_shardings)
      state, meta = checkpointer.restore(latest, target, train_iter)
      if process_index == 0:
        print(f'resumed from {checkpointer.directory} at step {latest}', flush=True)
    step = int(jax.device_get(state['step']))
    writer.truncate_after(step)
    progress = metrics_lib.Progress(config.total_steps, step, config.batch_size, len(devices),
                                    core_hours_before=meta.get('core_hours', 0.0), enabled=process_index == 0)
    pending: list[tuple[int, Any]] = []  # Step metrics not yet checked on the host (no per-step sync).
    last_saved = latest
    eval_metrics: dict[str, float] = {}

    def check_finite():
      for s, m in jax.device_get(pending):
        # The loss is computed before the update and the parameter norm after it: both must be finite.
        bad = [k for k in ('train/loss', 'train/param_norm') if not np.isfinite(m[k])]
        if bad:
          kept = f'the last good checkpoint is step {last_saved}' if last_saved is not None else 'nothing was saved'
          raise NonFiniteLossError(f'{bad[0]} is {m[bad[0]]} at step {s}; stopped without saving ({kept}). '
                                   'Lower the learning rate or check the data, then rerun to resume.')
      last = pending[-1] if pending else None
      pending.clear()
      return last

    def save(at_step):
      nonlocal last_saved
      check_finite()
      checkpointer.save(at_step, state, train_iter, {'core_hours': progress.core_hours()})
      last_saved = at_step

    preempted = False
    with _StopFlag() as stop:
      while step < config.total_steps:
        if stop.requested or checkpointer.reached_preemption(step):
          if last_saved != step:
            save(step)
          preempted = True
          if process_index == 0:
            print(f'preempted at step {step}: checkpoint saved; rerun the same command to resume.', flush=True)
          break
        batch = sharding.global_batch(next(train_iter), batch_sharding)
        state, step_metrics = p_train_step(state, batch)
        step += 1
        pending.append((step, step_metrics))
        is_last = step == config.total_steps
        record = {}
        if step % config.log_every_steps == 0 or is_last:
          _, logged = check_finite()
          perf = progress.update(step)
          record.update(logged, **perf)
          progress.line(step, logged['train/loss'], perf)
        if config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last):
          eval_metrics = evaluate(state['ema_params'] if use_ema else state['params'])
          record.update(eval_metrics)
          if process_index == 0:
            print(f'step {step} | ' + ' | '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()), flush=True)
        if record:
          writer.write(step, record)
        if step % config.checkpoint_every_steps == 0 or is_last:
          save(step)
    checkpointer.wait()
    checkpointer.close()
  return {'step': step, 'preempted': preempted, 'eval': eval_metrics, 'state': state}
