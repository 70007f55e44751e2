"""Orbax checkpoints of the train state, the data iterator and run bookkeeping, under WORKDIR/checkpoints.

On resume the newest step is checked before orbax reads an array: its metadata must hold the state this config
builds (another model, optimizer or process count is one line naming the first difference, and the step stays).
A step that cannot be read (array files truncated or gone, garbage metadata, an empty directory) is reported in
one line, moved to WORKDIR/checkpoints.unreadable/ (never deleted: a person may still recover it) and the next
older step is tried; when none is readable the run stops with UnreadableCheckpointError rather than silently
starting over, also on later starts while checkpoints.unreadable/ holds steps.
"""
import functools
import os
import re
import sys
from typing import Any

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from train import paths

UNREADABLE = 'checkpoints.unreadable'


class UnreadableCheckpointError(ValueError):
  """A workdir has checkpoints, none of which can be read."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint of another run: another model, optimizer state or process count."""


@functools.cache
def _type_handlers():
  """Orbax's standard type handlers; on CPU jax.Arrays are written without replica-parallel writes.

  Those split each replicated array across devices with one small compiled slice per shape: a win across
  TPU hosts, pure compile time when all devices share one CPU. Passed to our own handlers only: overriding
  orbax's global registry made it log a warning on every run.
  """
  handlers = [(t, ocp.type_handlers.get_type_handler(t)) for t in ocp.type_handlers.supported_types()]
  if jax.default_backend() == 'cpu':
    handlers = [(t, ocp.type_handlers.ArrayHandler(use_replica_parallel=False) if t is jax.Array else h)
                for t, h in handlers]
  return ocp.type_handlers.create_type_handler_registry(*handlers)


def _tree_handler():
  return ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):  # DictKey, GetAttrKey (named tuples), SequenceKey.
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a/b/0/c' -> shape of every array (or ShapeDtypeStruct, or orbax metadata) leaf of `tree`."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, 'shape')}


def stored_shapes(directory: str, key: str | None = None) -> dict[str, tuple[int, ...]]:
  """Name -> shape of the arrays a checkpoint item holds (of its subtree `key`), read from its metadata only.

  Read by the item's handler, not a Checkpointer: that one logs warnings about the step-level metadata an
  item directory lacks, and returns None instead of raising when the metadata cannot be read.
  """
  tree = _tree_handler().metadata(epath.Path(directory)).tree
  return flat_shapes(tree if key is None else tree.get(key, {}))


def first_difference(stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> str | None:
  """"'NAME' has shape A there but B in this model" for the first name whose shapes differ, else None."""
  for name in sorted(set(stored) | set(wanted)):
    theirs, ours = stored.get(name), wanted.get(name)
    if theirs != ours:
      return (f'{name!r} is absent there but has shape {ours} in this model' if theirs is None else
              f'{name!r} has shape {theirs} there but is absent in this model' if ours is None else
              f'{name!r} has shape {theirs} there but {ours} in this model')
  return None


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process: one decision that every process of a multi-host run takes alike."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _is_closed_loop_noise(unraisable) -> bool:
  return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'


def drop_closed_loop_noise() -> None:
  """Drops, for the rest of the process, the one traceback per array that a failed read leaves behind.

  When orbax gives up on an unreadable checkpoint it closes its event loop while tensorstore still completes
  other reads; each completion's callback then finds the loop closed, and Python prints the RuntimeError as an
  unraisable exception (hundreds of tracebacks for a large model) after the one error that matters.
  """
  if not getattr(sys.unraisablehook, 'drops_closed_loop_noise', False):
    previous = sys.unraisablehook
    hook = lambda unraisable: None if _is_closed_loop_noise(unraisable) else previous(unraisable)
    hook.drops_closed_loop_noise = True
    sys.unraisablehook = hook


# Tensorstore's statuses for a read that may succeed later (its errors are ValueErrors that start with them).
_TRANSIENT_STATUSES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'ABORTED', 'CANCELLED')


def _not_the_files_fault(error: BaseException) -> bool:
  """Whether a failed read says nothing about the checkpoint's files: memory, permissions, a network or disk
  that may come back. Such a step is not moved aside; the error ends the run (to be retried, or fixed)."""
  for _ in range(8):  # The error and its causes.
    if error is None:
      return False
    if isinstance(error, MemoryError) or str(error).startswith(_TRANSIENT_STATUSES):
      return True
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, NotADirectoryError)):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:
  """Async saves; restore of the newest readable step straight into the target shardings."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    self.workdir = paths.absolute(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.unreadable = os.path.join(self.workdir, UNREADABLE)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
      registry.add('state', args, _tree_handler())
    self.manager = ocp.CheckpointManager(
        self.directory, handler_registry=registry,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, meta: dict[str, Any]) -> None:
    """Starts an async save; the device->host copy is done on return, so the state may be donated after."""
    args = {'state': ocp.args.PyTreeSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def check(self, step: int, abstract_state) -> None:
    """IncompatibleCheckpointError, without reading an array, when `step` holds another state than
    `abstract_state` (another model, adapter or optimizer); OSError and the like when its metadata is unreadable."""
    stored = stored_shapes(os.path.join(self.directory, str(step), 'state'))
    params = first_difference({k[len('trainable/'):]: v for k, v in stored.items() if k.startswith('trainable/')},
                              flat_shapes(abstract_state['trainable']))
    if params:
      raise IncompatibleCheckpointError(
          f'{self.workdir} holds another model: parameter {params}; resume with the config it was trained with '
          f'({self.workdir}/config.json) or start a new --workdir.')
    other = first_difference(stored, flat_shapes(abstract_state))
    if other:
      raise IncompatibleCheckpointError(
          f'{self.workdir} holds another training state: {other.replace("this model", "this config")} (another '
          f'optimizer or EMA setting?); resume with the config it was trained with ({self.workdir}/config.json) '
          'or start a new --workdir.')

  def restore(self, step: int, abstract_state, data_iter):
    """Restores `step`: arrays land in the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
    args = {'meta': ocp.args.JsonRestore()}
    if data_iter is not None:
      step_dir = os.path.join(self.directory, str(step))
      written = data_process_counts(step_dir)
      if written and jax.process_count() not in written:  # grain would fail deep inside, naming a file.
        n = ' or '.join(map(str, written))
        processes = 'process' if n == '1' else 'processes'
        raise IncompatibleCheckpointError(
            f'{step_dir} was written by {n} {processes} (a data position each) and resumes only with as many, not '
            f'{jax.process_count()}: rerun with {n} {processes}, or start over in a new --workdir.')
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args['state'] = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored['state'], restored['meta']

  def restore_latest(self, abstract_state, data_iter) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest readable step, or None when the workdir has no checkpoint at all."""
    drop_closed_loop_noise()
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = None
      try:
        self.check(step, abstract_state)
        state, meta = self.restore(step, abstract_state, data_iter)
      except IncompatibleCheckpointError:  # Readable, and another run's: never moved.
        raise
      except Exception as e:  # noqa: BLE001 - whatever orbax, tensorstore or grain make of broken files.
        if _not_the_files_fault(e):
          raise
        problem = e
      if not any_process(problem is not None):
        return step, state, meta
      self._move_aside(step, problem)
    moved = self.unreadable_steps()
    if moved:
      raise UnreadableCheckpointError(
          f'no readable checkpoint in {self.directory}; the unreadable steps {", ".join(moved)} were moved to '
          f'{self.unreadable}. '
          f'Move one back if it can be repaired, or delete {self.unreadable} to start over from scratch.')
    return None

  def unreadable_steps(self) -> list[str]:
    folder = epath.Path(self.unreadable)
    return sorted((p.name for p in folder.iterdir()), key=_step_order) if folder.is_dir() else []

  def _move_aside(self, step: int, problem: BaseException | None) -> None:
    """Moves an unreadable step to checkpoints.unreadable/ (process 0; the others wait for it)."""
    source = epath.Path(self.directory, str(step))
    target = epath.Path(self.unreadable, str(step))
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      n = 1
      while target.exists():  # A step unreadable before, and written again since.
        target, n = epath.Path(self.unreadable, f'{step}.{n}'), n + 1
      source.rename(target)
      reason = (f'{type(problem).__name__}: {" ".join(str(problem).split())[:200]}' if problem is not None else
                'unreadable on another process')
      print(f'warning: checkpoint step {step} in {self.directory} cannot be read ({reason}); moved it to {target}, '
            'trying the step before it.', file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'moved aside checkpoint step {step}')
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _step_order(name: str):
  number, _, copy = name.partition('.')
  return (int(number), int(copy or 0)) if number.isdigit() and (copy or '0').isdigit() else (float('inf'), 0)


def data_process_counts(step_dir: str) -> list[int]:
  """N of the data iterator states in a checkpoint step (grain's data/process_{i}-of-{N}.json), normally one."""
  data = epath.Path(step_dir, 'data')
  if not data.is_dir():
    return []
  found = (re.fullmatch(r'process_\d+-of-(\d+)\.json', f.name) for f in data.iterdir())
  return sorted({int(m[1]) for m in found if m})


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(directory: str, params) -> None:
  """Writes a parameters-only checkpoint (numpy or jax leaves) to DIRECTORY/params."""
  with ocp.Checkpointer(_tree_handler()) as checkpointer:
    checkpointer.save(os.path.join(paths.absolute(directory), 'params'), args=ocp.args.PyTreeSave(params), force=True)
