"""Orbax checkpoints of the train state, the data iterator and run bookkeeping, under WORKDIR/checkpoints."""
import functools
import os
import re
from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from train import paths


@functools.cache
def _use_plain_array_writes_on_cpu() -> None:
  if jax.default_backend() == 'cpu':
    # Replica-parallel writes split each replicated array across devices with one small compiled
    # slice per shape: a win across TPU hosts, pure compile time when all devices share one CPU.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """Async saves; restore of the latest step straight into the target shardings."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    _use_plain_array_writes_on_cpu()
    self.directory = os.path.join(paths.absolute(workdir), 'checkpoints')
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
      step_dir = os.path.join(self.directory, str(step))
      written = data_process_counts(step_dir)
      if written and jax.process_count() not in written:  # grain would fail deep inside, naming a file.
        n = ' or '.join(map(str, written))
        processes = 'process' if n == '1' else 'processes'
        raise ValueError(f'{step_dir} was written by {n} {processes} (a data position each) and resumes only with '
                         f'as many, not {jax.process_count()}: rerun with {n} {processes}, or start over in a new '
                         '--workdir.')
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored['state'], restored['meta']

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


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
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(paths.absolute(directory), 'params'), params, force=True)
