"""The training loop: config -> mesh and rules -> sharded state -> jitted steps -> metrics, eval, checkpoints.

It knows no particular model, objective or method: `config.model_name` names a module under models/ (its `Model`
class is built with `config.model`), `config.task.name` an objective in train/objectives.py, `config.adapter.name`
an adapter in train/adapters.py (what trains and what stays frozen), `config.data` an input pipeline.

Frozen trees: the adapter's `base`, and each tree the objective needs (`objective.frozen_needs`), which
`config.frozen` provides by name: `'init'` (the run's initial parameters: init_params, or the seeded init) or
the path of an imported model or a workdir. They are rebuilt at every start, fresh or resumed, and never saved.
"""
import json
import math
import os
import signal
import threading
import time
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from data import pipeline
from train import adapters, build, cli, compute, evaluation, objectives, runs, sharding
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import profiling
from train import state as state_lib
from train import steps as steps_lib
from train import workdir as workdir_lib
from train.build import build_model  # noqa: F401 - `loop.build_model` is public

REQUIRED_FIELDS = ('model_name', 'model', 'task', 'batch_size', 'total_steps', 'seed', 'log_every_steps',
                   'eval_every_steps', 'checkpoint_every_steps', 'mesh', 'optimizer', 'schedule', 'data',
                   'sharding_rules')


def check_config(config, num_devices: int, process_count: int) -> tuple[int, ...]:
  """Fails fast, with one line, on what would otherwise fail deep inside the run or train silently wrong.

  Intervals are whole numbers of steps: log_every_steps and checkpoint_every_steps at least 1 (the last step
  is always logged and saved as well), eval_every_steps at least 0, where 0 means never (not even at the end).
  Learning rates, warmups, weight decay and clipping thresholds are >= 0 (a learning rate of 0 keeps the
  initial parameters: how an imported model is evaluated through the loop); EMA decay, momentum, Adam's
  betas and warmup_fraction lie in [0, 1].
  """
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ValueError(f'config lacks fields {missing}; every config sets {list(REQUIRED_FIELDS)}.')
  if config.total_steps <= 0 and not config.get('budget'):  # A budget sets total_steps.
    raise ValueError(f'total_steps={config.total_steps} must be positive (or set config.budget).')
  for name, least in (('log_every_steps', 1), ('checkpoint_every_steps', 1), ('eval_every_steps', 0)):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f'{name}={value!r} must be a whole number of steps >= {least}'
                       f'{" (0: never evaluate)" if least == 0 else ""}; set --config.{name}.')
  ranges = [(f'schedule.{f}', None) for f in ('base_learning_rate', 'end_learning_rate', 'warmup_steps')]
  ranges += [(f'optimizer.{f}', None) for f in ('weight_decay', 'grad_clip_norm', 'agc_clip', 'sam_rho')]
  ranges += [(name, 1) for name in ('schedule.warmup_fraction', 'optimizer.ema_decay', 'optimizer.momentum',
                                    'optimizer.b1', 'optimizer.b2')]
  for name, most in ranges:
    section, field = name.split('.')
    value = (config.get(section) or {}).get(field)
    if value is None:  # Unset: the option is off or takes its default.
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= (most or float('inf')):
      raise ValueError(f'{name}={value!r} must be {"in [0, 1]" if most else ">= 0"}; set --config.{name}.')
  shape = sharding.mesh_shape(config.mesh, num_devices)
  data_parallel = shape[0] * shape[1]
  if shape[2] > 1:
    _check_sequence_split(config, shape[2])
  for name in ('batch_size', 'eval_batch_size'):
    size = config.get(name) or config.batch_size
    if size < 1:
      raise ValueError(f'{name}={size} must be positive.')
    if size % data_parallel:
      raise ValueError(f'{name}={size} is not divisible by the data-parallel size data*fsdp={data_parallel}; '
                       f'use a multiple of {data_parallel}.')
    if size % process_count:
      raise ValueError(f'{name}={size} is not divisible by the {process_count} processes.')
  microbatches = config.get('microbatches') or 1
  per_device = config.batch_size // data_parallel
  if not isinstance(microbatches, int) or microbatches < 1 or per_device % microbatches:
    raise ValueError(f'microbatches={microbatches!r} does not divide the per-device batch {per_device} '
                     f'(batch_size={config.batch_size} over data*fsdp={data_parallel}); use a divisor of {per_device}.')
  return shape


def _check_sequence_split(config, shards: int) -> None:
  """mesh.sequence > 1 splits each row's tokens over devices: the model must have a token axis it can split
  (its module's check_sequence_split), the rules must map the token axis ('length') to 'sequence', and the
  model must accept the config's row length over that many devices."""
  module = build.model_module(config)
  if not hasattr(module, 'check_sequence_split'):
    raise ValueError(f'mesh.sequence={shards}: model_name={config.model_name!r} has no token axis to split over '
                     'devices (sequence parallelism is for token models: their module defines check_sequence_split); set '
                     '--config.mesh.sequence=1.')
  rule = str((config.get('sharding_rules') or {}).get('length') or '')
  if 'sequence' not in [a.strip() for a in rule.split(',')]:
    raise ValueError(f"mesh.sequence={shards} but sharding_rules.length={rule!r} does not name it: the tokens would "
                     "not be split; set --config.sharding_rules.length=sequence.")
  length = config.data.get('seq_len') or config.data.get('max_length')
  if not length:
    raise ValueError(f'mesh.sequence={shards} needs the row length (config.data.seq_len) to split it.')
  for n in (int(length), *(n for _, n in (config.data.get('grow_length') or ()))):  # and every GrowLength stage's
    module.check_sequence_split(build.model_kwargs(config), n, shards)


def frozen_sources(config, objective) -> dict[str, str]:
  """config.frozen (name -> 'init' or a path) checked against what the objective needs."""
  given = config.get('frozen') or {}
  given = dict(given.to_dict() if hasattr(given, 'to_dict') else given)
  missing = [n for n in objective.frozen_needs if not given.get(n)]
  if missing:
    raise ValueError(f'the {config.task.name!r} objective needs the frozen tree {missing[0]!r}; set '
                     f"config.frozen.{missing[0]}='init' (the run's initial parameters) or a model directory.")
  if state_lib.BASE in given:
    raise ValueError(f'config.frozen.{state_lib.BASE} is the adapter\'s own frozen tree; name yours otherwise.')
  return {n: str(v) for n, v in given.items() if v}


class _StopFlag:
  """Set by SIGTERM (a preemption notice) or a first Ctrl-C (SIGINT): the loop saves and exits at the next step
  boundary, with PREEMPTED_EXIT like a preemption.

  A second Ctrl-C ends the process at once with status 130 (128 + SIGINT, what a shell reports for Ctrl-C),
  through os._exit: unwinding would wait for the save in flight, and the person pressing twice wants out now.
  Nothing is lost but the steps since the last complete checkpoint: orbax finalises a step by renaming its
  temporary directory, so a half-written one is never resumed from. `on_abort` runs first (the workdir lock is
  released there).

  Only for a single process: with several, a signal reaching one host must not make it leave the
  collectives alone, so there JAX's preemption service (orbax's `reached_preemption`, synced across
  hosts) is the only trigger.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool, on_abort=None):
    self.requested = False
    self.enabled = enabled
    self.on_abort = on_abort
    self.interrupts = 0
    self._previous = {}

  def __enter__(self):
    if self.enabled and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum != signal.SIGINT:
      self.requested = True
      return
    self.interrupts += 1
    self.requested = True
    if self.interrupts == 1:
      # os.write, not print: a handler may run while the main thread is inside print's buffer.
      os.write(2, b'\nstopping at the next step boundary to save a checkpoint (Ctrl-C again: stop at once, '
                  b'losing the steps since the last one)\n')
      return
    if self.on_abort is not None:
      self.on_abort()
    os.write(2, b'error: interrupted twice: stopped without saving; rerun the same command to resume from the '
                b'last checkpoint\n')
    os._exit(cli.INTERRUPTED_EXIT)

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def _initial_params(config, fns, source: str | None = None):
  """The whole model's parameters a run starts from, in this run's shardings.

  `source` None or 'init' (config.frozen's name for them): the run's initial parameters, `runs.initial_params`:
  config.init_params (an imported model or another run's workdir, its evaluated parameters) less what
  config.init_params_exclude matches, which is freshly initialised like the seeded init; without init_params,
  the seeded init. Any other `source` (a frozen tree's own model directory) is restored whole: the exclusion
  is about this run's start, not about another model it reads."""
  target = checkpoint_lib.abstract_with_shardings(fns.abstract_params, fns.param_shardings)
  if source in (None, 'init'):
    return runs.initial_params(config, target, fns.init_params, fns.init_key)
  runs.check_same_kind(config, source, field='config.frozen')
  return runs.restore_params(source, target)


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
  """Trains (or resumes) the run in `workdir` on `devices` (default: all), holding the workdir's lock.

  Returns {'step', 'preempted', 'eval', 'state', 'frozen'}. A workdir another live run holds raises
  workdir.WorkdirLockedError (a ValueError) before anything there changes.
  """
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  lock = workdir_lib.Lock(workdir, enabled=jax.process_index() == 0)
  refused = None
  try:
    lock.acquire()
  except workdir_lib.WorkdirLockedError as e:
    refused = e
  if checkpoint_lib.any_process(refused is not None):  # Every process stops, not only process 0.
    raise refused or workdir_lib.WorkdirLockedError(f'{workdir} is in use by another run (see process 0).')
  with lock:
    return _train(config, workdir, devices, lock)


def _train(config, workdir: str, devices, lock: workdir_lib.Lock) -> dict[str, Any]:
  devices = jax.devices() if devices is None else list(devices)
  process_index, process_count = jax.process_index(), jax.process_count()
  check_config(config, len(devices), process_count)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.sharding_rules)
  model = build_model(config)
  objective = objectives.make_objective(config.task)
  adapter = adapters.make_adapter(config.get('adapter'))
  sources = frozen_sources(config, objective)
  eval_batch_size = config.get('eval_batch_size') or config.batch_size

  train_iter = pipeline.make_train_iter(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                        process_index=process_index, process_count=process_count)
  evaluators = evaluation.build(config, objective, global_batch_size=eval_batch_size, process_index=process_index,
                                process_count=process_count)
  # The init example comes from config.data's eval split whatever the evaluators: adding or changing one (say,
  # at another resolution) never changes the shapes of the parameters a run starts or resumes with.
  example_batches, _ = pipeline.make_eval_iter(config.data, global_batch_size=eval_batch_size,
                                               process_index=process_index, process_count=process_count)
  example = objective.example_input(next(iter(example_batches())))
  # Recorded in each checkpoint: what the model was initialised on (the run loader rebuilds a seeded base).
  example_spec = {'shape': list(example.shape), 'dtype': str(example.dtype)}
  # Training FLOPs count a training example, whose shape may differ from an eval one (224 vs 256 pixels):
  # peek at the first training batch and rewind the iterator, so the data order is untouched.
  position = train_iter.get_state()
  input_shape = tuple(objective.example_input(next(train_iter)).shape[1:])
  train_iter.set_state(position)
  flops_per_example = compute.train_flops_per_example(config, input_shape)
  hardware = compute.run_hardware(config, devices)
  if config.get('budget'):  # Before the steps are built, so the schedule follows the budget.
    num_examples = pipeline.num_train_examples(config.data)
    config.total_steps = (_budgeted_steps_so_far(config, workdir) or
                          compute.resolve_budget(config, num_train_examples=num_examples, input_shape=input_shape,
                                                 flops_per_example=flops_per_example))
    if process_index == 0:
      print(compute.budget_summary(config, config.total_steps, num_train_examples=num_examples,
                                   flops_per_example=flops_per_example, hardware=hardware), flush=True)
  if hardware:
    compute.peak_flops(hardware)  # 'cpu' is measured here, not between training steps.

  writer = metrics_lib.MetricWriter(workdir, enabled=process_index == 0, tensorboard=True)
  profiler = profiling.StepProfiler(config.get('profile_steps'), os.path.join(workdir, 'profile'),
                                    enabled=process_index == 0)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.get('checkpoints_to_keep', 3))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps_lib.build(config, mesh, rules, model, objective, adapter, example, frozen_names=tuple(sources))

    def evaluate(at_step: int, chosen) -> dict[str, float]:
      """The logged metrics of the `chosen` evaluators on the current state (EMA and raw), a line each."""
      logged = {}
      for metrics in evaluation.run(chosen, fns, objective, state, frozen).values():
        logged.update(metrics)
        if process_index == 0:
          print(evaluation.line(at_step, metrics), flush=True)
      return logged

    # The newest step this config can resume from, checked against it before any array is read (unreadable
    # steps are moved aside); None for a fresh workdir.
    target = checkpoint_lib.abstract_with_shardings(fns.abstract_state, fns.state_shardings)
    try:
      restored = checkpointer.restore_latest(target, train_iter)
    except BaseException:
      checkpointer.close()
      raise
    latest = restored[0] if restored else None
    # The frozen trees come from the initial parameters at every start, fresh or resumed.
    frozen = {}
    if latest is None:
      starts_from_init = not (config.get('init_params') or config.get('init_params_exclude'))
      state, base = fns.init(fns.init_key) if starts_from_init else fns.start(_initial_params(config, fns))
      meta = {'core_hours': 0.0, 'train_flops': 0.0, 'train_tokens': 0}
    elif state_lib.BASE in fns.frozen_shardings:
      _, base = fns.split(_initial_params(config, fns))
    if state_lib.BASE in fns.frozen_shardings:
      frozen[state_lib.BASE] = base
    for name, source in sources.items():  # Own buffers: a tree shared with the donated state would be freed.
      frozen[name] = _initial_params(config, fns, source)
    if latest is not None:
      _, state, meta = restored
      if process_index == 0:
        print(f'resumed from {checkpointer.directory} at step {latest}', flush=True)
    if process_index == 0:  # Only now, the checkpoint matching this config: what ran, for tools that reload it.
      workdir_lib.write_atomically(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    step = int(jax.device_get(state['step']))
    writer.truncate_after(step)
    if process_index == 0:
      print(metrics_lib.startup_line(devices, mesh, adapters.num_elements(fns.abstract_params),
                                     adapters.num_elements(fns.abstract_state['trainable']), state, frozen),
            flush=True)
      if hasattr(adapter, 'describe'):
        print(adapter.describe(state['trainable'], frozen.get(state_lib.BASE, {})), flush=True)
    progress = metrics_lib.Progress(config.total_steps, step, config.batch_size,
                                    len(devices) * compute.CORES_PER_DEVICE.get(hardware, 1),
                                    core_hours_before=meta.get('core_hours', 0.0), enabled=process_index == 0)
    pending: list[tuple[int, Any]] = []  # Step metrics not yet checked on the host (no per-step sync).
    last_saved = latest
    eval_metrics: dict[str, float] = {}
    if step == 0 and config.get('eval_at_start'):  # The untrained (or imported) model's held-out numbers.
      eval_metrics = evaluate(0, evaluators)
      writer.write(0, eval_metrics)

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
      checkpointer.save(at_step, state, train_iter, {'core_hours': progress.core_hours(), 'example_input': example_spec,
                                                     'train_flops': seen['flops'], 'train_tokens': seen['tokens']})
      last_saved = at_step

    train_step = None
    # Training FLOPs and tokens so far, summed per step: a batch's shape may change during a run (GrowLength's
    # growing rows), and with it the FLOPs of an example. A checkpoint from before these were kept: the
    # constant-shape product.
    seen = {'flops': float(meta.get('train_flops', step * config.batch_size * flops_per_example)),
            'tokens': int(meta.get('train_tokens', step * config.batch_size * math.prod(input_shape)))}
    token_rows = len(input_shape) == 1  # token models: an example's input is a row of token ids
    flops_by_shape = {tuple(input_shape): flops_per_example}

    def flops_of_shape(shape):
      if shape not in flops_by_shape:
        flops_by_shape[shape] = compute.train_flops_per_example(config, shape)
      return flops_by_shape[shape]
    step_shape = None
    once = {'compute/flops_per_example_analytic': flops_per_example,  # On the first logged line.
            'compute/params': adapters.num_elements(fns.abstract_params),
            'compute/trainable_params': adapters.num_elements(fns.abstract_state['trainable'])}

    def compile_train_step(state, batch, learning_rate, shape):
      """Compiles the train step ahead of time, once: XLA's FLOP count comes from the same lowering. An earlier
      run of the same program in this process (a sweep) left it in `fns.compiled`."""
      started = time.perf_counter()
      args = (state, frozen, batch, learning_rate)
      signature = (str(jax.tree.structure(args)),
                   tuple((x.shape, str(x.dtype), getattr(x, 'sharding', None)) for x in jax.tree.leaves(args)))
      reused = signature in fns.compiled
      if not reused:
        lowered = fns.train.lower(*args)
        fns.compiled[signature] = (lowered.compile(), compute.measured_train_flops(lowered, config))
      compiled, xla = fns.compiled[signature]
      if xla is not None:
        once['compute/flops_per_example_xla'] = xla
      if process_index == 0:
        how = 'reused from an earlier run in this process' if reused else 'compiled in'
        what = 'train step' if step_shape is None else f'train step for the new input shape {shape}'
        print(f'{compute.flops_line(flops_of_shape(shape), xla)} | {what} {how} '
              f'{time.perf_counter() - started:.1f} s', flush=True)
      return compiled

    preempted = False
    stop = _StopFlag(enabled=process_count == 1, on_abort=lock.release)
    try:
      with stop:
        while step < config.total_steps:
          if stop.requested or checkpointer.reached_preemption(step):
            if last_saved != step:
              save(step)
            preempted = True
            if process_index == 0:
              print(f'preempted at step {step}: checkpoint saved; rerun the same command to resume.', flush=True)
            break
          profiler.before_step(step)
          local = next(train_iter)
          # From this process's numpy rows: slicing the global batch would run a program (on one process only
          # where only it asks, a collective the others never join).
          shape = tuple(objective.example_input(local).shape[1:])
          batch = sharding.global_batch(local, fns.batch_sharding)
          learning_rate = fns.learning_rates[step]
          if shape != step_shape:  # The first step, or a new row length: one compilation per shape.
            train_step, step_shape = compile_train_step(state, batch, learning_rate, shape), shape
          with profiler.annotate(step):
            state, step_metrics = train_step(state, frozen, batch, learning_rate)
          step += 1
          seen['flops'] += config.batch_size * flops_of_shape(shape)
          seen['tokens'] += config.batch_size * math.prod(shape)
          profiler.after_step(step, (state, step_metrics))
          pending.append((step, step_metrics))
          is_last = step == config.total_steps
          record = {}
          if step % config.log_every_steps == 0 or is_last:
            _, logged = check_finite()
            perf = progress.update(step)
            record.update(logged, **perf, **once,
                          **compute.progress_metrics(seen['flops'], perf['compute/core_hours'], hardware))
            if token_rows:
              record['compute/train_tokens'] = seen['tokens']
            once.clear()
            progress.line(step, logged['train/loss'], perf)
          due = [e for e in evaluators if e.spec.due(step, is_last)]
          if due:
            latest_eval = evaluate(step, due)
            record.update(latest_eval)
            eval_metrics.update(latest_eval)  # Each evaluator's latest numbers, whatever their cadences.
          if record:
            writer.write(step, record)
          if step % config.checkpoint_every_steps == 0 or is_last:
            save(step)
    finally:
      with stop:  # While the last save completes, a second Ctrl-C still stops at once.
        checkpointer.wait()  # Good checkpoints still in flight are completed, also on errors.
      checkpointer.close()
      profiler.close()
      writer.close()

  return {'step': step, 'preempted': preempted, 'eval': eval_metrics, 'state': state, 'frozen': frozen}
