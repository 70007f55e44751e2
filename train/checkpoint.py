"""Orbax checkpoints of the train state, the data iterator and run bookkeeping, under WORKDIR/checkpoints."""
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async saves; restore of the latest step straight into the target shardings."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    if jax.default_backend() == 'cpu':
      # Replica-parallel writes split each replicated array across devices with one small compiled
      # slice per shape: a win across TPU hosts, pure compile time when all devices share one CPU.
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, meta: dict[str, Any]) -> None:
    """Starts an async save; the device->host copy is done on return, so the state may be donated after."""
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, data_iter):
    """Restores `step`: arrays land in the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
    args = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored['state'], restored['meta']

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(directory: str, params) -> None:
  """Writes a parameters-only checkpoint (numpy or jax leaves) to DIRECTORY/params."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(os.path.abspath(directory), 'params'), params, force=True)


def restore_params(path: str, abstract_params, *, step: int | None = None, key: str = 'params'):
  """Parameters only, into the shapes, dtypes (cast on read) and shardings of `abstract_params`.

  `path` is a directory written by `python -m train.convert import` (PATH/params) or a training workdir
  (its latest checkpoint's state[key], or `step`'s; the optimizer state is never read).
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'params')):
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.join(path, 'params'), abstract_params)
  directory = os.path.join(path, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{path} has neither params/ (an imported model) nor checkpoints/ (a training '
                            'workdir); point at one of those.')
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {directory}: train first.')
    target = {key: abstract_params}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=args))['state'][key]
