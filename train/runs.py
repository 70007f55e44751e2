"""The whole, evaluated parameters of a finished or running run, or of an imported model, for any model.

A directory is either written by `python -m train.convert import` (config.json + params/) or a training workdir
(config.json + checkpoints/). A workdir's checkpoints hold only the trainable parameters (and their EMA): the
frozen base of its adapter is rebuilt from the run's own initial parameters (its init_params, or its seeded
initialisation) and merged back. What is evaluated (the EMA copy when kept) is decided in train/state.py.

`restore_params(path, target)` loads into `target`'s shapes, dtypes (cast on read) and shardings; a shape that
differs is one line naming the first mismatching parameter and both shapes. The loop's init_params and the
tools' run loader both go through here.
"""
import json
import os

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from train import adapters, build, checkpoint, paths
from train import state as state_lib


def read_config(path: str) -> ml_collections.ConfigDict:
  record = epath.Path(path, 'config.json')
  if not record.exists():
    raise FileNotFoundError(f'{path} has no config.json: point at a directory written by `python -m train` or '
                            '`python -m train.convert import`.')
  return ml_collections.ConfigDict(json.loads(record.read_text()))


def is_imported(path: str) -> bool:
  return epath.Path(path, 'params').is_dir()


def latest_step(path: str, step: int | None = None) -> int:
  """`step`, or the latest checkpoint step of the workdir `path`; FileNotFoundError when there is none."""
  directory = os.path.join(paths.absolute(path), 'checkpoints')
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f'{path} has neither params/ (an imported model) nor checkpoints/ (a training '
                            'workdir); point at one of those.')
  with ocp.CheckpointManager(directory) as manager:
    steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {directory}: train first.')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'{directory} has no step {step}; it has {sorted(steps)}.')
  return max(steps) if step is None else step


def _stored_shapes(directory: str, key: str | None = None) -> dict[str, tuple[int, ...]]:
  """Name -> shape of the arrays a checkpoint item holds (of its subtree `key`), read from its metadata."""
  return checkpoint.stored_shapes(directory, key)


def check_shapes(stored: dict[str, tuple[int, ...]], target, where: str) -> None:
  """One line naming the first parameter whose stored shape differs from (or is missing in) `target`: every
  parameter of both, so a config of fewer layers than its checkpoint is refused, not partially restored."""
  difference = checkpoint.first_difference(stored, checkpoint.flat_shapes(target))
  if difference:
    raise ValueError(f'{where}: parameter {difference}; make config.model match the source (or re-import it '
                     'with --scan to match scan).')


def stored_param_shapes(path: str, step: int | None = None) -> dict[str, tuple[int, ...]]:
  """Name -> shape of the evaluated (trainable) parameters stored in `path`."""
  path = paths.absolute(path)
  if is_imported(path):
    return _stored_shapes(os.path.join(path, 'params'))
  key = state_lib.evaluated_key(read_config(path))
  step = latest_step(path, step)
  return _stored_shapes(os.path.join(path, 'checkpoints', str(step), 'state'), key)


def _restore_workdir(path: str, key: str, target, step: int):
  with ocp.CheckpointManager(os.path.join(path, 'checkpoints')) as manager:
    wanted = {key: target}
    args = ocp.args.PyTreeRestore(item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                                  partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args, meta=ocp.args.JsonRestore()))
  return restored['state'][key], restored['meta']


def seeded_params(config, example, target):
  """The parameters a run with `config` starts from when it has no init_params: its model's seeded init."""
  model = build.build_model(config)
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  shardings = jax.tree.map(lambda t: t.sharding, target)
  init = jax.jit(lambda rng: model.init({'params': rng, 'dropout': rng}, example)['params'], out_shardings=shardings)
  return nn.unbox(init(init_key))


def restore_params(path: str, target, *, step: int | None = None):
  """The whole model's evaluated parameters of `path` into `target` (ShapeDtypeStructs with shardings)."""
  checkpoint.drop_closed_loop_noise()
  path = paths.absolute(path)
  if is_imported(path):
    check_shapes(_stored_shapes(os.path.join(path, 'params')), target, path)
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.join(path, 'params'), target)
  config = read_config(path)
  step = latest_step(path, step)
  adapter = adapters.make_adapter(config.get('adapter'))
  trainable_target, base_target = adapter.split(target, jax.random.key(0))
  key = state_lib.evaluated_key(config)
  check_shapes(stored_param_shapes(path, step), trainable_target, f'{path} step {step}')
  trainable, meta = _restore_workdir(path, key, trainable_target, step)
  if not base_target:
    return trainable
  # The base was never saved: rebuild it as the run did at its start.
  if config.get('init_params'):
    initial = restore_params(config.init_params, target)
  else:
    spec = meta.get('example_input')
    if not spec:
      raise ValueError(f'{path} step {step} records no example_input to rebuild its frozen base from its seed; '
                       'retrain it with this version.')
    initial = seeded_params(config, jnp.zeros(spec['shape'], spec['dtype']), target)
  _, base = adapter.split(initial, jax.random.key(0))
  return adapter.merge(trainable, base)
