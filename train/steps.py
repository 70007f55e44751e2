"""The jitted, sharded functions of a run: parameter init, the trainable/frozen split, the train and eval steps.

Built from (config, mesh, rules, model, objective, adapter, example input); the loop and the benchmarks share
them, so a benchmark times exactly the step that trains. Call `build` under `jax.set_mesh(mesh)` and
`nn.logical_axis_rules(rules)`, and run the returned functions under the same contexts.

One step: merge the adapter's trainable and frozen halves, the objective's summed loss over each micro-batch
(`config.microbatches`, a scan; gradients and sums added up), divide by the summed weight, one optax update of
the trainable parameters, EMA. Nothing here depends on which model, objective or adapter runs.

SAM (`config.optimizer.sam_rho` > 0; Foret et al. 2020, `sam_loss_and_grads`) is an option of that one step: the
gradient g at w over the whole batch gives the ascent point w + rho g / ||g||_2, and the gradient there (same
batch, same micro-batches, same dropout rng) is what the optimizer's update from w receives, so clipping, AGC
and weight decay act on it as on a plain gradient. The ascent is the plain global form: ||g|| and the ascent
point come from the gradient of the whole global batch, identical on every device. Brock et al. 2021 (NFNets,
A.4) instead took each replica's ascent from its own rows, unsynced (m-sharpness), on 20% of the batch; that
variant is not offered here. SAM costs a second forward and backward per step (see train/compute.py).
"""
import collections
import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from train import adapters as adapters_lib
from train import optimizers, sharding
from train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Steps:
  init: Callable[[jax.Array], tuple[Any, Any]]  # rng -> (state, frozen base) of the seeded parameters: a fresh run
  start: Callable[[Any], tuple[Any, Any]]     # params -> (state, frozen base): a fresh run from given parameters
  init_params: Callable[[jax.Array], Any]     # rng -> the model's seeded parameters (not jitted: see runs)
  split: Callable[[Any], tuple[Any, Any]]     # params -> (trainable, frozen base), sharded
  train: Callable[[Any, Any, Any, Any], tuple[Any, Any]]  # (state, frozen, batch, lr) -> (state, metrics); donates state
  eval: Callable[[Any, Any, Any], Any]        # (trainable, frozen, global batch) -> replicated sums
  abstract_params: Any                        # the model's whole parameter tree (ShapeDtypeStructs)
  param_shardings: Any
  abstract_state: Any
  state_shardings: Any
  frozen_shardings: dict[str, Any]            # name -> shardings of each frozen tree the step receives
  batch_sharding: NamedSharding
  schedule: optax.Schedule
  learning_rates: np.ndarray  # schedule(step) for every step of the run; the train step's `lr` input
  init_key: jax.Array
  trainable_fraction: float   # the trainable share of the parameters (for the FLOPs of a backward pass)
  # What callers compile from these functions, kept for the next run of the same program (see `build`):
  # e.g. the loop's ahead-of-time compiled train step, keyed by its arguments' shapes and shardings.
  compiled: dict = dataclasses.field(default_factory=dict, compare=False)


# XLA options for programs that run once per run (parameter init, the adapter's split): on CPU, LLVM's
# optimisation level 0. A seeded init is mostly the random draws of every parameter (threefry, unrolled), which
# optimised take longer to compile than the train step (23 s against 19 s for the CPU study's smallest NFNet) and
# unoptimised 7 s, to run in 18 ms instead of 12. Every program computing a seeded init uses them (`jit_once`),
# so a frozen base rebuilt by the run loader equals the one the run trained with, bit for bit.
ONCE_OPTIONS = {'xla_backend_optimization_level': 0}


# XLA options for the train and eval steps on CPU: YNNPACK gets the dots only. By default XLA:CPU also hands
# it reductions and elementwise fusions, which run slower there than XLA's own loops on our steps (float32, 2
# cores: NFNet-F0's train step 3.27 -> 2.45 s, the small Mistral's 7.6 -> 6.2 s; ViT-B/16's within noise). Not
# for decoding, whose small dots gain from YNNPACK's fused epilogues (benchmarks/README.md).
STEP_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


def jit_step(fn, **kwargs):
  """jax.jit for a train or eval step (see STEP_OPTIONS; other backends get their defaults)."""
  options = STEP_OPTIONS if jax.default_backend() == 'cpu' else None
  return jax.jit(fn, compiler_options=options, **kwargs)


def jit_once(fn, **kwargs):
  """jax.jit for a program run once per run (see ONCE_OPTIONS; other backends get their defaults)."""
  options = ONCE_OPTIONS if jax.default_backend() == 'cpu' else None
  return jax.jit(fn, compiler_options=options, **kwargs)


def _unbox(boxed_abstract):
  """Strips the logical-axis boxes of abstract values (no sharding constraint on shapes)."""
  return jax.tree.map(lambda b: b.unbox(apply_constraint=False), boxed_abstract,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def split_microbatches(batch, microbatches: int):
  """[B, ...] -> [microbatches, B / microbatches, ...]: micro-batch i takes rows i, i + m, i + 2m, ..., so each
  device's contiguous share of the batch gives an equal part of every micro-batch (no data moves)."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // microbatches, microbatches, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def ascent_point(trainable, grads, rho: float):
  """The SAM ascent point w + rho g / ||g||_2 (Foret et al. 2020, eq. 2-3, p = 2) of w = `trainable`, g = `grads`.

  The norm is the global L2 norm over the whole trainable tree, in float32. No epsilon is added to it: a zero
  gradient leaves w where it is (the direction is undefined there, and an epsilon would only bias tiny norms).
  """
  norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
  scale = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jax.tree.map(lambda w, g: (w + scale * g.astype(jnp.float32)).astype(w.dtype), trainable, grads)


def sam_loss_and_grads(loss_and_grads, trainable, rho: float):
  """(loss, sums) at w and (loss, gradient) at the ascent point, `loss_and_grads(params) -> (loss, sums, grads)`.

  Two passes, traced twice. One loop of two iterations (the first at w, from a zero gradient) compiles the pass
  once, 25 s instead of 45 s for a finetune step of the CPU study, but XLA's CPU backend then runs the step 2-3x
  slower (37 s against 12 s for one of its runs): not worth it.
  """
  loss, sums, grads = loss_and_grads(trainable)
  ascent_loss, _, ascent_grads = loss_and_grads(ascent_point(trainable, grads, rho))
  return loss, sums, ascent_loss, ascent_grads


# Config fields the compiled programs never read: how long a run is and what it logs, evaluates, saves and reads.
# Everything else in the config (and any field added later) is part of a program's identity.
RUN_ONLY_FIELDS = frozenset({
    'total_steps', 'schedule', 'budget', 'study', 'data', 'evals', 'batch_size', 'eval_batch_size',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'checkpoints_to_keep', 'eval_at_start',
    'profile_steps', 'init_params', 'init_params_exclude', 'init_params_posemb', 'frozen'})
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_MAX_PROGRAMS = 4


def _program_key(config, mesh, rules, model, objective, adapter, example, frozen_names) -> str:
  """Everything the traced programs depend on; batch shapes are not in it (jit keys on them itself)."""
  fields = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_FIELDS}

  def described(obj):
    fields = sorted(vars(obj).items()) if hasattr(obj, '__dict__') else ''
    return f'{type(obj).__module__}.{type(obj).__qualname__}{fields}'

  return json.dumps({
      'config': fields, 'mesh': [list(mesh.axis_names), list(mesh.devices.shape), [d.id for d in mesh.devices.flat]],
      'rules': [list(map(str, r)) for r in rules], 'model': repr(model), 'objective': described(objective),
      'adapter': described(adapter), 'example': [list(example.shape), str(example.dtype)],
      'frozen': sorted(frozen_names),
      'jax': [str(jax.config.jax_default_matmul_precision), bool(jax.config.jax_enable_x64)]},
      sort_keys=True, default=repr)


def build(config, mesh, rules, model, objective, adapter, example, frozen_names=()) -> Steps:
  """The run's functions. `frozen_names`: the frozen trees besides the adapter's base (whole parameter trees,
  e.g. 'reference').

  Runs of one program in one process (a sweep's learning rates and budgets of a model, one after another) share
  the jitted functions and what was compiled from them: only the schedule is the run's own. Tracing, lowering
  and loading compiled executables from XLA's persistent cache cost seconds per run otherwise, more than a small
  run's training. Which config fields do not shape a program is `RUN_ONLY_FIELDS`; the rest is the key.
  """
  key = _program_key(config, mesh, rules, model, objective, adapter, example, frozen_names)
  program = _PROGRAMS.pop(key, None)
  if program is None:
    program = _build_program(config, mesh, rules, model, objective, adapter, example, frozen_names)
  _PROGRAMS[key] = program
  while len(_PROGRAMS) > _MAX_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  schedule = optimizers.make_schedule(config.schedule, config.total_steps)
  learning_rates = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(config.total_steps + 1)))
  return dataclasses.replace(program, schedule=schedule, learning_rates=learning_rates)


def _build_program(config, mesh, rules, model, objective, adapter, example, frozen_names) -> Steps:
  model = adapter.wrap(model)  # Parameters an adapter adds to the model are created and applied there.
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  split_key = jax.random.fold_in(init_key, 1)
  use_ema = bool(config.optimizer.get('ema_decay'))
  microbatches = int(config.get('microbatches') or 1)
  sam_rho = float(config.optimizer.get('sam_rho') or 0.0)
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)

  def boxed_params(rng):
    return model.init({'params': rng, 'dropout': rng}, example)['params']  # Models default to eval mode.

  boxed = jax.eval_shape(boxed_params, init_key)
  boxed_trainable, boxed_base = jax.eval_shape(lambda: adapter.split(boxed_params(init_key), split_key))
  param_shardings = sharding.param_shardings(boxed, mesh, rules)
  trainable_shardings = sharding.param_shardings(boxed_trainable, mesh, rules)
  base_shardings = sharding.param_shardings(boxed_base, mesh, rules) if boxed_base else {}
  abstract_params, abstract_trainable = _unbox(boxed), _unbox(boxed_trainable)
  frozen_shardings = {name: param_shardings for name in frozen_names}
  if boxed_base:
    frozen_shardings[state_lib.BASE] = base_shardings

  # The learning rate enters the step as an input, not as the schedule's formula: the compiled step then
  # does not depend on the run's length, and one compilation serves every budget of a sweep (see `build`).
  # The optimizer state is the same either way (a schedule callable keeps its step count).
  tx_for = lambda lr: optimizers.make_optimizer(config.optimizer, lambda count: lr, abstract_trainable)
  tx = tx_for(0.0)

  def init_state(trainable):
    return state_lib.create(trainable, tx, use_ema)

  abstract_state = jax.eval_shape(init_state, abstract_trainable)
  state_shardings = {'step': replicated, 'trainable': trainable_shardings,
                     'opt_state': sharding.like_params(abstract_state['opt_state'], abstract_trainable,
                                                       trainable_shardings, mesh)}
  if use_ema:
    state_shardings['ema'] = trainable_shardings

  def summed_loss(trainable, frozen, batch, rng):
    params = adapter.merge(trainable, frozen.get(state_lib.BASE, {}))
    return objective.loss(model, params, frozen, batch, rng, train=True)

  def weight_of(sums):
    return jnp.where(sums['weight'] > 0, sums['weight'], 1.0)

  def loss_and_grads(trainable, frozen, batch, rng):
    """(mean loss, summed sums, gradients of the mean loss) over the whole batch, in micro-batches."""
    if microbatches == 1:
      def mean_loss(t):
        loss_sum, sums = summed_loss(t, frozen, batch, rng)
        return loss_sum / weight_of(sums), sums
      (loss, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(trainable)
      return loss, sums, grads
    micro = split_microbatches(batch, microbatches)
    micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def accumulate(carry, xs):
      one, i = xs
      (loss_sum, sums), grads = grad_fn(trainable, frozen, one, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss_sum, sums, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, trainable, frozen, first, rng))
    zeros = (zeros[0][0], zeros[0][1], zeros[1])
    (loss_sum, sums, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(microbatches)))
    weight = weight_of(sums)
    return loss_sum / weight, sums, jax.tree.map(lambda g: g / weight, grads)

  def train_step(state, frozen, batch, learning_rate):
    rng = jax.random.fold_in(step_key, state['step'])  # Per-step randomness from (seed, step): resumes draw the same.
    extra = {}
    if sam_rho:
      # train/loss and the objective's metrics stay those at w; the loss at the ascent point is reported aside.
      loss, sums, ascent_loss, grads = sam_loss_and_grads(lambda t: loss_and_grads(t, frozen, batch, rng),
                                                          state['trainable'], sam_rho)
      extra = {'train/sam_ascent_loss': ascent_loss}
    else:
      loss, sums, grads = loss_and_grads(state['trainable'], frozen, batch, rng)
    updates, opt_state = tx_for(learning_rate).update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    # grad_norm is the norm of what the optimizer received (with SAM, the gradient at the ascent point).
    metrics = {'train/loss': loss, 'train/learning_rate': learning_rate, 'train/grad_norm': optax.tree.norm(grads),
               'train/param_norm': optax.tree.norm(trainable), **extra, **objective.train_summary(sums)}
    return state_lib.advance(state, trainable, opt_state, config.optimizer), metrics

  def start(params):
    trainable, base = adapter.split(params, split_key)
    return init_state(trainable), base

  def eval_step(trainable, frozen, batch):
    params = adapter.merge(trainable, frozen.get(state_lib.BASE, {}))
    return objective.eval_sums(model, params, frozen, batch)

  # One compilation each for what a run needs at its start (the persistent cache keeps them).
  return Steps(
      init=jit_once(lambda rng: start(nn.unbox(boxed_params(rng))), out_shardings=(state_shardings, base_shardings)),
      start=jit_once(start, in_shardings=(param_shardings,), out_shardings=(state_shardings, base_shardings)),
      init_params=lambda rng: nn.unbox(boxed_params(rng)),
      split=jit_once(lambda params: adapter.split(params, split_key), in_shardings=(param_shardings,),
                     out_shardings=(trainable_shardings, base_shardings)),
      train=jit_step(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval=jit_step(eval_step, in_shardings=(trainable_shardings, frozen_shardings, batch_sharding),
                    out_shardings=replicated),
      abstract_params=abstract_params, param_shardings=param_shardings, abstract_state=abstract_state,
      state_shardings=state_shardings, frozen_shardings=frozen_shardings, batch_sharding=batch_sharding,
      schedule=None, learning_rates=None, init_key=init_key,
      trainable_fraction=adapters_lib.trainable_fraction(adapter, abstract_params))
