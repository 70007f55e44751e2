r"""Evaluates a training run's checkpoint with its evaluators, and nothing else.

  python -m train.evaluate --workdir=DIR [--step=N] [--config.key=value ...]

Reads DIR/config.json (what the run trained with), applies the --config overrides (a value is a Python literal
where it parses, else a string; `--config.key=value` with an `=`), restores from the latest checkpoint (or
--step) only the parameters evaluated: the evaluated tree and, with EMA, the raw one (frozen trees are rebuilt
from the run's initial parameters, as at every start of the run), and runs every evaluator of the config
(train/evaluation.py): `config.evals`, or config.data's eval split. One line per evaluator on stdout, and one
JSON record {step, overrides, metrics, time} appended to DIR/evaluations.jsonl (metrics.jsonl stays the training
log). Checkpoints and config.json are only read.

An override must name a field of the run's config, except under `evals`, where it may add an evaluator or a
field of one:

  python -m train.evaluate --workdir=DIR --config.evals.minival.split='train[90%:]' --config.eval_batch_size=64

A live run's workdir may be evaluated: the workdir's lock is not taken, and only checkpoints that orbax has
finalised (renamed from their temporary directory) are listed, so a save in flight is never read. A checkpoint
that the run deletes meanwhile (checkpoints_to_keep) fails the read; rerun with a newer --step.

Exit status: 0, or 2 with one `error:` line for a workdir without config.json or checkpoints, a --step it does
not hold (the line lists those it does), an override of no field, or a bad evaluator.
"""
import ast
import datetime
import json
import os
import sys

from absl import app, flags
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from train import cli

FLAGS = flags.FLAGS
RECORDS = 'evaluations.jsonl'
_PREFIX = '--config.'


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module next to other
  commands' modules defines nothing twice)."""
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/).')
  flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
  flags.DEFINE_bool('traceback', False, 'Show the full traceback of an error before its one line.')


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """`config` with each 'key.path=value' set; ValueError (one line) for an override of no field, outside `evals`."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--config.{item}: write --config.KEY=VALUE.')
    *parents, last = key.split('.')
    creating = parents[:1] == ['evals'] or key == 'evals'  # New evaluators, or fields of one.
    node = config
    for i, part in enumerate(parents):
      if part not in node or node[part] is None:
        if not creating:
          raise ValueError(f'--config.{key}: {".".join(parents[:i + 1])} is not a field of this run\'s config.')
        node[part] = ml_collections.ConfigDict()
      node = node[part]
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f'--config.{key}: {".".join(parents[:i + 1])} is a value, not a section.')
    if last not in node and not creating:
      raise ValueError(f'--config.{key}: no such field in this run\'s config.json (overrides name existing '
                       'fields; new ones only under evals).')
    try:
      node[last] = _literal(text)
    except TypeError as e:
      raise ValueError(f'--config.{key}={text}: {cli.one_line(e)}') from None
  return config


def _manager(workdir: str):
  return ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                               options=ocp.CheckpointManagerOptions(create=False))


def _example(workdir: str, step: int, config, objective) -> jax.ShapeDtypeStruct:
  """The example input the run's parameters were initialised on (recorded in each checkpoint)."""
  with _manager(workdir) as manager:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  spec = meta.get('example_input')
  if spec:
    return jax.ShapeDtypeStruct(tuple(spec['shape']), jnp.dtype(spec['dtype']))
  from data import pipeline  # Older checkpoints: the first example of config.data's eval split, as the loop took.
  batches, _ = pipeline.make_eval_iter(config.data, global_batch_size=config.get('eval_batch_size') or
                                       config.batch_size)
  example = objective.example_input(next(iter(batches())))
  return jax.ShapeDtypeStruct(example.shape, example.dtype)


def _restore(workdir: str, step: int, fns) -> dict:
  """{'trainable'[, 'ema']} of checkpoint `step`, straight into the step's shardings (nothing else is read)."""
  from train import checkpoint as checkpoint_lib
  from train import runs
  keys = [k for k in ('trainable', 'ema') if k in fns.abstract_state]
  stored = checkpoint_lib.stored_shapes(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  for key in keys:
    mine = {n[len(key) + 1:]: s for n, s in stored.items() if n.startswith(key + '/')}
    if not mine:
      raise ValueError(f'{workdir} step {step} holds no {key!r} parameters (was optimizer.ema_decay changed?); '
                       'evaluate with the optimizer settings the run trained with.')
    runs.check_shapes(mine, fns.abstract_state[key], f'{workdir} step {step}')
  wanted = {k: checkpoint_lib.abstract_with_shardings(fns.abstract_state[k], fns.state_shardings[k]) for k in keys}
  args = ocp.args.PyTreeRestore(item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                                partial_restore=True)
  checkpoint_lib.drop_closed_loop_noise()
  with _manager(workdir) as manager:
    return manager.restore(step, args=ocp.args.Composite(state=args))['state']


def _check_batch(config, num_devices: int) -> int:
  """The eval batch size, checked against the devices it is spread over (the training batch does not matter)."""
  from train import sharding
  shape = sharding.mesh_shape(config.mesh, num_devices)
  size = config.get('eval_batch_size') or config.batch_size
  for parts, what in ((shape[0] * shape[1], 'the data-parallel size data*fsdp'),
                      (jax.process_count(), 'the process count')):
    if size % parts:
      raise ValueError(f'eval_batch_size={size} is not divisible by {what}={parts}; set --config.eval_batch_size '
                       f'to a multiple of {parts}.')
  return size


def evaluate_checkpoint(workdir: str, step: int | None = None, overrides=(), devices=None) -> dict:
  """Evaluates `workdir`'s checkpoint `step` (default: the latest) with its config and `overrides` ('a.b=value');
  returns the record {step, overrides, metrics, time} that process 0 appends to workdir/evaluations.jsonl."""
  from train import adapters, evaluation, loop, objectives, runs, sharding
  from train import state as state_lib
  from train import steps as steps_lib
  from train import paths
  workdir = paths.absolute(workdir)
  config = apply_overrides(runs.read_config(workdir), overrides)
  if runs.is_imported(workdir):
    raise ValueError(f'{workdir} is an imported model, not a training workdir: evaluate it through `python -m '
                     'train` with init_params pointing at it and base_learning_rate=0.')
  step = runs.latest_step(workdir, step)
  devices = jax.devices() if devices is None else list(devices)
  eval_batch_size = _check_batch(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.sharding_rules)
  model = loop.build_model(config)
  objective = objectives.make_objective(config.task)
  adapter = adapters.make_adapter(config.get('adapter'))
  sources = loop.frozen_sources(config, objective)
  evaluators = evaluation.build(config, objective, global_batch_size=eval_batch_size,
                                process_index=jax.process_index(), process_count=jax.process_count())
  example = _example(workdir, step, config, objective)
  example = jnp.zeros(example.shape, example.dtype)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps_lib.build(config, mesh, rules, model, objective, adapter, example, frozen_names=tuple(sources))
    restored = _restore(workdir, step, fns)
    frozen = {}  # Rebuilt as the run rebuilds them at every start.
    if state_lib.BASE in fns.frozen_shardings:
      _, frozen[state_lib.BASE] = fns.split(loop._initial_params(config, fns))
    for name, source in sources.items():
      frozen[name] = loop._initial_params(config, fns, source)
    results = evaluation.run(evaluators, fns, objective, restored, frozen)
  metrics = {}
  for logged in results.values():
    metrics.update(logged)
    if jax.process_index() == 0:
      print(evaluation.line(step, logged), flush=True)
  record = {'step': step, 'overrides': list(overrides), 'metrics': metrics,
            'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  if jax.process_index() == 0:
    _append(os.path.join(workdir, RECORDS), json.dumps(record))
  return record


def _append(path: str, line: str) -> None:
  from train import paths
  if paths.is_url(path):  # Object stores do not append: rewrite the whole (small) file.
    target = epath.Path(path)
    target.write_text((target.read_text() if target.exists() else '') + line + '\n')
    return
  with open(path, 'a') as f:  # One write of one line: concurrent evaluations do not interleave.
    f.write(line + '\n')


def _parse(argv):
  """absl's parsing of the flags, with the --config.* overrides set aside (they name fields of config.json)."""
  overrides = [a[len(_PREFIX):] for a in argv[1:] if a.startswith(_PREFIX)]
  try:
    rest = FLAGS([a for a in argv if not a.startswith(_PREFIX)])
  except flags.Error as e:
    cli.fail(f'{e} (see --help)')
  if not FLAGS.workdir:
    cli.fail('--workdir is required: a training workdir (config.json and checkpoints/).')
  cli.quiet_logging()
  return rest, overrides


def main(parsed) -> None:
  rest, overrides = parsed
  cli.no_arguments(rest, 'overrides are written --config.KEY=VALUE')
  from train import distributed
  try:  # A multi-host slice (or $JAX_COORDINATOR_ADDRESS...) evaluates with all its processes, as it trained.
    distributed.initialize()
  except ValueError as e:
    cli.fail(e)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  with cli.ending_failures(FLAGS.traceback):
    evaluate_checkpoint(FLAGS.workdir, FLAGS.step, overrides)
  distributed.shutdown()


if __name__ == '__main__':
  sys.modules['__main__'].__doc__ = __doc__
  define_flags()
  app.run(main, flags_parser=_parse)
