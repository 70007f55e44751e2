"""The whole, evaluated parameters of a finished or running run, or of an imported model, for any model.

A directory is either written by `python -m train.convert import` (config.json + params/) or a training workdir
(config.json + checkpoints/). A workdir's checkpoints hold only the trainable parameters (and their EMA): the
frozen base of its adapter is rebuilt from the run's own initial parameters (its init_params, or its seeded
initialisation) and merged back. What is evaluated (the EMA copy when kept) is decided in train/state.py.

`restore_params(path, target)` loads into `target`'s shapes, dtypes (cast on read) and shardings; a shape that
differs is one line naming the first mismatching parameter and both shapes. The loop's init_params and the
tools' run loader both go through here.

`initial_params(config, target, init_fn, init_key)` is what a run starts from: its seeded init, or
`config.init_params` (a pretraining workdir or an imported model of the same model_name) less the parameters
whose '/'-joined names `config.init_params_exclude` matches in full (e.g. 'head/.*': a new class count), which
are neither read nor kept but come from the run's own seeded init. A loaded parameter of another shape (a ViT's
position embedding at a new resolution) goes through its model module's hook `adapt_param(name, value,
target_shape, model_kwargs, *, source_kwargs, method)`, `method` being `config.init_params_posemb`; a module
without the hook, or a hook that returns None, refuses the difference in one line.
"""
import functools
import json
import os
import re

from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from train import adapters, build, checkpoint, paths, steps
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


def restore_trainable(path: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, the evaluated trainable parameters as stored) of a workdir: with an adapter, only its own part
  (LoRA's factors), on the first device."""
  path = paths.absolute(path)
  config = read_config(path)
  step = latest_step(path, step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = _nest({n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=device)
                  for n, s in stored_param_shapes(path, step).items()})
  return config, _restore_workdir(path, state_lib.evaluated_key(config), target, step)[0]


def _seeded_init(config, example):
  """(fn: rng -> the seeded parameters of a run with `config`, not jitted; the run's init key)."""
  model = build.build_model(config)
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  return (lambda rng: nn.unbox(model.init({'params': rng, 'dropout': rng}, example)['params'])), init_key


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
  key = state_lib.evaluated_key(config)
  stored = stored_param_shapes(path, step)
  if getattr(adapter, 'new_params', None):
    # The adapter's own parameters (LoRA's factors) are the checkpoint's trainable ones; `target` is the plain
    # model's, which the adapter's export returns.
    some = next(iter(_flat_leaves(target).values()))
    trainable_target = _nest({n: jax.ShapeDtypeStruct(s, some.dtype, sharding=_replicated(some.sharding))
                              for n, s in stored.items()})
    base_target = target
  else:
    trainable_target, base_target = adapter.split(target, jax.random.key(0))
  check_shapes(stored, trainable_target, f'{path} step {step}')
  trainable, meta = _restore_workdir(path, key, trainable_target, step)
  if not base_target:
    return trainable
  # The base was never saved: rebuild it as the run did at its start.
  spec = meta.get('example_input')
  if not spec and (not config.get('init_params') or config.get('init_params_exclude')):
    raise ValueError(f'{path} step {step} records no example_input to rebuild its frozen base from its seed; '
                     'retrain it with this version.')
  example = jnp.zeros(spec['shape'], spec['dtype']) if spec else None
  initial = initial_params(config, target, *_seeded_init(config, example))
  if getattr(adapter, 'new_params', None):
    initial = _nest({**_flat_leaves(initial), **_flat_leaves(trainable)})
  _, base = adapter.split(initial, jax.random.key(0))
  return adapter.export(trainable, base)


# config.init_params_posemb when unset: big_vision's way (see models/vit.py resample_grid).
DEFAULT_POSEMB_RESAMPLING = 'bilinear'


def check_same_kind(config, path: str, field: str = 'init_params') -> None:
  """One line when `path` holds another kind of model than `config` builds."""
  theirs = read_config(path)
  if theirs.get('model_name') != config.model_name:
    raise ValueError(f'{path} holds model_name={theirs.get("model_name")!r}, this run {config.model_name!r}; '
                     f'point {field} at a model of the same kind.')


def exclusion_pattern(config) -> re.Pattern | None:
  """config.init_params_exclude compiled (None when unset); one line when it is set without init_params or is
  not a regex. check_config may call it to fail before any data is read."""
  pattern = config.get('init_params_exclude')
  if not pattern:
    return None
  if not config.get('init_params'):
    raise ValueError('init_params_exclude is set but init_params is not: set --config.init_params=DIR (a '
                     'pretraining workdir or an imported model)')
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'init_params_exclude={pattern!r} is not a valid regex ({e}); fix --config.init_params_exclude.'
                     ) from None


def _source_shapes(path: str, source_config) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every parameter of the model in `path` (a workdir's adapter base included)."""
  if is_imported(path):
    return stored_param_shapes(path)
  adapter = adapters.make_adapter(source_config.get('adapter'))
  if isinstance(adapter, adapters.NoAdapter):  # Everything is in the checkpoint: its metadata has the shapes.
    return stored_param_shapes(path)
  spec = _recorded_example(path, latest_step(path))
  model = build.build_model(source_config)
  init = lambda key, x: nn.unbox(model.init({'params': key, 'dropout': key}, x)['params'])
  example = jax.ShapeDtypeStruct(tuple(spec['shape']), jnp.dtype(spec['dtype']))
  return checkpoint.flat_shapes(jax.eval_shape(init, jax.random.key(0), example))


def _recorded_example(path: str, step: int) -> dict:
  with ocp.CheckpointManager(os.path.join(path, 'checkpoints')) as manager:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  spec = meta.get('example_input')
  if not spec:
    raise ValueError(f'{path} step {step} records no example_input to rebuild its parameter shapes from; retrain '
                     'it with this version.')
  return spec


def _replicated(sharding):
  """A sharding on the same devices that fits any shape: for a parameter read at the source's shape."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def _names_look_like(names) -> str:
  shown = sorted(names)[:4]
  return ', '.join(repr(n) for n in shown) + (', ...' if len(names) > len(shown) else '')


def load_params(config, path: str, target) -> dict:
  """Nested dict of the parameters of `path` that `config` loads (those of `target` not matched by
  config.init_params_exclude), in `target`'s shardings and dtypes. Excluded parameters are not read: orbax
  restores only the named arrays, except from a workdir trained with an adapter, whose frozen base is rebuilt
  whole. One line for an exclusion matching nothing, a parameter missing on either side, or one whose shape
  differs and that the model's `adapt_param` hook cannot fit."""
  checkpoint.drop_closed_loop_noise()
  path = paths.absolute(path)
  exclude = exclusion_pattern(config)
  source_config = read_config(path)
  # What the run's adapter adds to the model (LoRA's factors) is never in the source: it starts from the seed.
  added = getattr(adapters.make_adapter(config.get('adapter')), 'new_params', None)
  ours = {n: s for n, s in checkpoint.flat_shapes(target).items() if not (added and re.fullmatch(added, n))}
  theirs = _source_shapes(path, source_config)
  excluded = {n for n in set(ours) | set(theirs) if exclude and exclude.fullmatch(n)}
  if exclude and not excluded:
    raise ValueError(f'init_params_exclude={exclude.pattern!r} matches no parameter (a regex matched in full '
                     f'against names like {_names_look_like(ours)}); fix --config.init_params_exclude.')
  where = f'init_params={path}'
  difference = checkpoint.first_difference({n: s for n, s in theirs.items() if n not in excluded and n not in ours},
                                           {n: s for n, s in ours.items() if n not in excluded and n not in theirs})
  if difference:
    raise ValueError(f'{where}: parameter {difference}; make config.model match the source, or set '
                     '--config.init_params_exclude to a regex matching it to initialise it afresh.')
  flat_target = {n: leaf for n, leaf in _flat_leaves(target).items() if n not in excluded and n in ours}
  hook = getattr(build.model_module(config), 'adapt_param', None)
  method = config.get('init_params_posemb') or DEFAULT_POSEMB_RESAMPLING
  fits = {}  # name -> fn(value at the source's shape) -> value at ours
  for name, leaf in flat_target.items():
    if theirs[name] == tuple(leaf.shape):
      continue
    fit = functools.partial(hook, name, target_shape=tuple(leaf.shape), model_kwargs=build.model_kwargs(config),
                            source_kwargs=source_config.get('model') or {}, method=method) if hook else None
    try:  # Abstractly: whether (and how) it fits is known before any array is read.
      fitted = fit and jax.eval_shape(fit, jax.ShapeDtypeStruct(theirs[name], leaf.dtype))
    except ValueError as e:
      raise ValueError(f'{where}: parameter {name!r} has shape {theirs[name]} there but {tuple(leaf.shape)} in this '
                       f'model and cannot be fitted ({e}; config.init_params_posemb={method!r}).') from None
    if fitted is None or tuple(fitted.shape) != tuple(leaf.shape):
      raise ValueError(f'{where}: parameter {name!r} has shape {theirs[name]} there but {tuple(leaf.shape)} in this '
                       f'model, and models.{config.model_name} cannot fit it; make config.model match the source, '
                       'or set --config.init_params_exclude to a regex matching it to initialise it afresh.')
    fits[name] = fit
  wanted = {n: jax.ShapeDtypeStruct(theirs[n], leaf.dtype, sharding=_replicated(leaf.sharding)) if n in fits else leaf
            for n, leaf in flat_target.items()}
  loaded = _flat_leaves(_restore_partial(path, source_config, _nest(wanted), theirs))
  unread = [n for n, leaf in loaded.items() if not isinstance(leaf, jax.Array)]
  if unread:  # orbax leaves a wanted array it did not find as its placeholder.
    raise ValueError(f'{where}: parameter {unread[0]!r} is listed there but could not be read; re-import or '
                     'retrain the source.')
  for name, fit in fits.items():
    loaded[name] = jax.jit(fit, out_shardings=flat_target[name].sharding)(loaded[name])
  return _nest(loaded)


def _restore_partial(path: str, source_config, wanted, theirs):
  """`wanted` (a subset of the source's parameters, as ShapeDtypeStructs) read from `path`."""
  if is_imported(path):
    directory = os.path.join(path, 'params')
    args = ocp.args.PyTreeRestore(item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                                  partial_restore=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(directory, args=args)
  step = latest_step(path)
  if set(theirs) == set(stored_param_shapes(path, step)):  # No adapter base: the checkpoint holds them all.
    return _restore_workdir(path, state_lib.evaluated_key(source_config), wanted, step)[0]
  # The source's frozen base is rebuilt from its own start: restore its whole model, then keep what is wanted.
  flat_wanted = _flat_leaves(wanted)
  some = next(iter(flat_wanted.values()))
  whole = {n: flat_wanted.get(n) or jax.ShapeDtypeStruct(s, some.dtype, sharding=_replicated(some.sharding))
           for n, s in theirs.items()}
  restored = _flat_leaves(restore_params(path, _nest(whole), step=step))
  return _nest({n: restored[n] for n in flat_wanted})


def _flat_leaves(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


def _nest(flat) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def initial_params(config, target, init_fn, init_key):
  """The whole model's parameters a run with `config` starts from, in `target`'s shardings: the seeded init
  `init_fn(init_key)` (`init_fn` not jitted: compiled here, see steps.jit_once), or config.init_params (see
  `load_params`) with the excluded parameters taken from that seeded init (only they are computed: the rest of
  the init is dead code to XLA)."""
  path = config.get('init_params')
  if not path:
    exclusion_pattern(config)  # init_params_exclude alone is a mistake.
    return steps.jit_once(init_fn, out_shardings=jax.tree.map(lambda t: t.sharding, target))(init_key)
  check_same_kind(config, path)
  loaded = _flat_leaves(load_params(config, path, target))
  flat_target = _flat_leaves(target)
  fresh_names = [n for n in flat_target if n not in loaded]
  if fresh_names:
    shardings = {n: flat_target[n].sharding for n in fresh_names}
    pick = lambda rng: {n: leaf for n, leaf in _flat_leaves(init_fn(rng)).items() if n in shardings}
    loaded.update(steps.jit_once(pick, out_shardings=shardings)(init_key))
  return _nest(loaded)
