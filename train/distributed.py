"""Joins the processes of a multi-host run into one JAX system, before anything starts a JAX backend.

Where the processes are described, first match wins:
  - arguments (the CLI's --coordinator_address, --num_processes, --process_id), each falling back to
    $JAX_COORDINATOR_ADDRESS (the variable jax.distributed itself reads), $JAX_NUM_PROCESSES and
    $JAX_PROCESS_ID (ours: jax reads no such variables); all three or none;
  - a Cloud TPU VM: jax.distributed finds the slice's hosts itself (the GCE metadata server, or
    TPU_WORKER_HOSTNAMES / TPU_WORKER_ID on GKE, MEGASCALE_* across slices); a single-host VM
    becomes a one-process system;
  - nothing: a single process, as without this module.
"""
import os

import jax

ENV_VARS = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
            'process_id': 'JAX_PROCESS_ID'}
_FLAGS = {'coordinator_address': '--coordinator_address', 'num_processes': '--num_processes',
          'process_id': '--process_id'}


def _int(name: str, value) -> int | None:
  if value is None or isinstance(value, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{_FLAGS[name]} (or ${ENV_VARS[name]}) = {value!r} is not an integer.') from None


def _tpu_slice_detectable() -> bool:
  """Whether this is a Cloud TPU VM whose slice jax.distributed can find by itself."""
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  # Set by `import jax` when libtpu is installed and TPU chips are on the PCI bus; no backend needed.
  if not getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False):
    return False
  on_gke = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES')
  return bool(on_gke) or 'TPU_SKIP_MDS_QUERY' not in os.environ  # Else the GCE metadata server.


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
  """Keyword arguments for `jax.distributed.initialize`: {} lets jax detect a TPU slice, None = one process."""
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes, 'process_id': process_id}
  given = {k: v if v not in (None, '') else (os.environ.get(ENV_VARS[k]) or None) for k, v in given.items()}
  if all(v is None for v in given.values()):
    return {} if _tpu_slice_detectable() else None
  given['num_processes'] = _int('num_processes', given['num_processes'])
  given['process_id'] = _int('process_id', given['process_id'])
  missing = [_FLAGS[k] for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f'a multi-process run needs all of --coordinator_address=HOST:PORT (process 0\'s), '
                     f'--num_processes and --process_id (or ${", $".join(ENV_VARS.values())}); '
                     f'missing {", ".join(missing)}.')
  address, count, index = given['coordinator_address'], given['num_processes'], given['process_id']
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.1:8476.')
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'--process_id={index} must be in [0, --num_processes={count}).')
  return given if count > 1 else None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed where several processes are meant to run; returns whether it did."""
  kwargs = settings(coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  if not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    # Cross-process collectives of CPU devices; the CPU client reads this when it is created.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return True


def shutdown() -> None:
  """Leaves the distributed system in step with the other processes (a no-op for one process)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
