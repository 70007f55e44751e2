"""The training loop: config -> mesh and rules -> sharded state -> jitted steps -> metrics, eval, checkpoints.

It knows no particular model or task: `config.model_name` names a module under models/ (its `Model` class is
built with `config.model`), `config.task.name` a task in train/tasks.py, `config.data` an input pipeline.
"""
import importlib
import json
import pkgutil
import signal
import threading
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import pipeline
from train import checkpoint as checkpoint_lib
from train import compute
from train import metrics as metrics_lib
from train import sharding, tasks
from train import steps as steps_lib

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
  if config.total_steps <= 0 and not config.get('budget'):  # A budget sets total_steps.
    raise ValueError(f'total_steps={config.total_steps} must be positive (or set config.budget).')
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
  """Set by SIGTERM (a preemption notice); the loop saves and exits at the next step boundary.

  Only for a single process: with several, a signal reaching one host must not make it leave the
  collectives alone, so there JAX's preemption service (orbax's `reached_preemption`, synced across
  hosts) is the only trigger.
  """

  def __init__(self, enabled: bool):
    self.requested = False
    self.enabled = enabled
    self._previous = None

  def __enter__(self):
    if self.enabled and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _initial_params(config, fns):
  """config.init_params: parameters of an imported model (train.convert) or of another run's workdir.

  Used when the run starts fresh; a resumed run restores its own checkpoint instead.
  """
  path = config.init_params
  source_config = epath.Path(path, 'config.json')
  if not source_config.exists():
    raise FileNotFoundError(f'init_params={path!r} has no config.json: point it at a directory written by '
                            '`python -m train.convert import` or a training workdir.')
  source = json.loads(source_config.read_text())
  ours = config.model.to_dict() if isinstance(config.model, ml_collections.ConfigDict) else dict(config.model)
  # Compute options (dtype, remat, attention_impl, ...) may differ; anything shaping a parameter may not.
  shaping = set(source.get('model', {})) & set(ours) - {'dtype', 'remat', 'attention_impl', 'block_size',
                                                        'dropout', 'conv_impl'}
  differ = {k: (source['model'][k], ours[k]) for k in sorted(shaping) if source['model'][k] != ours[k]}
  if source.get('model_name') != config.model_name or differ:
    raise ValueError(f'init_params={path!r} holds {source.get("model_name")} with {differ or "another model"} '
                     '(theirs, ours); make config.model match it (or re-import with --scan to match scan).')
  target = checkpoint_lib.abstract_with_shardings(fns.abstract_state['params'], fns.state_shardings['params'])
  return checkpoint_lib.restore_params(path, target)


def _budgeted_steps_so_far(config, workdir: str) -> int | None:
  """The total_steps a budget gave this workdir's run when it started, if it has checkpoints since.

  A resumed run keeps its length: a core-hours budget on 'cpu' depends on a peak measured at each start.
  """
  recorded = epath.Path(workdir, 'config.json')
  if not (recorded.exists() and epath.Path(workdir, 'checkpoints').exists()):
    return None
  previous = json.loads(recorded.read_text())
  ours = config.budget.to_dict() if hasattr(config.budget, 'to_dict') else dict(config.budget)
  return previous.get('total_steps') if previous.get('budget') == ours else None


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
  # Training FLOPs count a training example, whose shape may differ from an eval one (224 vs 256 pixels):
  # peek at the first training batch and rewind the iterator, so the data order is untouched.
  position = train_iter.get_state()
  input_shape = tuple(task.example_input(next(train_iter)).shape[1:])
  train_iter.set_state(position)
  flops_per_example = compute.train_flops_per_example(config, input_shape)
  hardware = compute.run_hardware(config, devices)
  if config.get('budget'):  # Before the steps are built, so the schedule follows the budget.
    num_examples = pipeline.num_train_examples(config.data)
    config.total_steps = (_budgeted_steps_so_far(config, workdir) or
                          compute.resolve_budget(config, num_train_examples=num_examples, input_shape=input_shape))
    if process_index == 0:
      print(compute.budget_summary(config, config.total_steps, num_train_examples=num_examples,
                                   flops_per_example=flops_per_example, hardware=hardware), flush=True)
  if hardware:
    compute.peak_flops(hardware)  # 'cpu' is measured here, not between training steps.

  writer = metrics_lib.MetricWriter(workdir, enabled=process_index == 0)
  if process_index == 0:  # What ran, for the record and for tools that reload the run (train.sample).
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    epath.Path(workdir, 'config.json').write_text(config.to_json_best_effort(indent=2))
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.get('checkpoints_to_keep', 3))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps_lib.build(config, mesh, rules, model, task, example)

    def evaluate(params) -> dict[str, float]:
      sums = None
      for local in eval_batches():
        out = fns.eval(params, sharding.global_batch(local, fns.batch_sharding))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      sums = jax.tree.map(lambda x: float(np.asarray(x, np.float64)), jax.device_get(sums))
      if int(sums['count']) != num_eval:
        raise RuntimeError(f'evaluation saw {int(sums["count"])} examples, expected {num_eval}.')
      return task.eval_summary(sums)

    latest = checkpointer.latest_step()
    if latest is None and config.get('init_params'):
      state = fns.init_from_params(_initial_params(config, fns))
      meta = {'core_hours': 0.0}
    elif latest is None:
      state = fns.init(fns.init_key)
      meta = {'core_hours': 0.0}
    else:
      target = checkpoint_lib.abstract_with_shardings(fns.abstract_state, fns.state_shardings)
      state, meta = checkpointer.restore(latest, target, train_iter)
      if process_index == 0:
        print(f'resumed from {checkpointer.directory} at step {latest}', flush=True)
    step = int(jax.device_get(state['step']))
    writer.truncate_after(step)
    progress = metrics_lib.Progress(config.total_steps, step, config.batch_size,
                                    len(devices) * compute.CORES_PER_DEVICE.get(hardware, 1),
                                    core_hours_before=meta.get('core_hours', 0.0), enabled=process_index == 0)
    pending: list[tuple[int, Any]] = []  # Step metrics not yet checked on the host (no per-step sync).
    last_saved = latest
    eval_metrics: dict[str, float] = {}
    if step == 0 and config.get('eval_at_start'):  # The untrained (or imported) model's held-out numbers.
      eval_metrics = evaluate(state['ema_params'] if fns.uses_ema else state['params'])
      writer.write(0, eval_metrics)
      if process_index == 0:
        print('step 0 | ' + ' | '.join(f'{k} {v:.6g}' for k, v in eval_metrics.items()), flush=True)

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

    train_step = None
    once = {'compute/flops_per_example_analytic': flops_per_example,  # On the first logged line.
            'compute/params': sum(x.size for x in jax.tree.leaves(fns.abstract_state['params']))}

    def compile_train_step(state, batch, learning_rate):
      """Compiles the train step ahead of time, once: XLA's FLOP count comes from the same lowering."""
      lowered = fns.train.lower(state, batch, learning_rate)
      xla = compute.measured_train_flops(lowered, config)
      if xla is not None:
        once['compute/flops_per_example_xla'] = xla
      if process_index == 0:
        print(compute.flops_line(flops_per_example, xla), flush=True)
      return lowered.compile()

    preempted = False
    try:
      with _StopFlag(enabled=process_count == 1) as stop:
        while step < config.total_steps:
          if stop.requested or checkpointer.reached_preemption(step):
            if last_saved != step:
              save(step)
            preempted = True
            if process_index == 0:
              print(f'preempted at step {step}: checkpoint saved; rerun the same command to resume.', flush=True)
            break
          batch = sharding.global_batch(next(train_iter), fns.batch_sharding)
          learning_rate = fns.learning_rates[step]
          if train_step is None:
            train_step = compile_train_step(state, batch, learning_rate)
          state, step_metrics = train_step(state, batch, learning_rate)
          step += 1
          pending.append((step, step_metrics))
          is_last = step == config.total_steps
          record = {}
          if step % config.log_every_steps == 0 or is_last:
            _, logged = check_finite()
            perf = progress.update(step)
            train_flops = step * config.batch_size * flops_per_example
            record.update(logged, **perf, **once,
                          **compute.progress_metrics(train_flops, perf['compute/core_hours'], hardware))
            once.clear()
            progress.line(step, logged['train/loss'], perf)
          if config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last):
            eval_metrics = evaluate(state['ema_params'] if fns.uses_ema else state['params'])
            record.update(eval_metrics)
            if process_index == 0:
              print(f'step {step} | ' + ' | '.join(f'{k} {v:.6g}' for k, v in eval_metrics.items()), flush=True)
          if record:
            writer.write(step, record)
          if step % config.checkpoint_every_steps == 0 or is_last:
            save(step)
    finally:
      checkpointer.wait()  # Good checkpoints still in flight are completed, also on errors.
      checkpointer.close()

  return {'step': step, 'preempted': preempted, 'eval': eval_metrics, 'state': state}
