"""Command line: python -m train --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.key=value ...]

Exit status (train/cli.py names them; train.launch's restart loop retries 1, 74 and 75, never 2 or 3):
  0   the run has reached total_steps.
  2   bad input, found at start-up where it can be: a config file that fails to load, an unknown override, an
      interval, learning rate or warmup out of range, a mesh or batch that does not fit the devices, a missing
      dataset, an unwritable workdir, a workdir in use by another run or holding another model, a checkpoint
      with nothing readable. Never retried: fix what the line says.
  3   a non-finite loss (a resumed run would repeat it exactly); the last good checkpoint is kept.
  74  an I/O failure while running (a full disk during a save, a network filesystem error): rerun the same
      command once the storage is back; it resumes from the last checkpoint.
  75  a preemption notice (SIGTERM) stopped the run after saving: rerun the same command to resume.
  1   anything unexpected (a bug).
--dry_run trains nothing and needs no --workdir: it builds the config's programs for its mesh on the devices
present (on a CPU, JAX_NUM_CPU_DEVICES=8 stands in for 8 chips), compiles the train step for abstract arguments
and prints the bytes per device of trainable parameters, optimizer state, frozen parameters, the batch and the
step's temporaries (train/memory.py); --hardware=tpu_v5e (etc.) compares the sum with that device's memory.

Each failure ends with one `error: ...` line on stderr saying what is wrong and what to do; --traceback adds the
full traceback before it.
"""
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

from train import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :ARGS.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl (resumed if present).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the bytes per device the run would hold; train nothing.')
_HARDWARE = flags.DEFINE_string('hardware', None, 'With --dry_run: the device whose memory the sum is compared '
                                'with (tpu_v4, tpu_v5e, tpu_v5p, tpu_v6e, h100; default: the devices present).')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show the full traceback of an error before its one line.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 in a multi-process run '
                                   '(default $JAX_COORDINATOR_ADDRESS; TPU slices are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (default $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1 '
                                   '(default $JAX_PROCESS_ID).')


def _parse(argv):
  rest = cli.parse_flags(argv, _CONFIG, example='configs/vit_digits.py')
  if not _WORKDIR.value and not _DRY_RUN.value:
    cli.fail('--workdir is required: the directory for checkpoints and metrics (resumed if it has any).')
  cli.quiet_logging()  # Library INFO chatter would drown the progress lines.
  return rest


def _check_workdir(workdir: str) -> None:
  """Creates the workdir and, when it is local, proves it writable before anything compiles."""
  from etils import epath
  from train import paths
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if not paths.is_url(workdir):  # A bucket's permissions show at the first write; a probe there costs a request.
      with tempfile.TemporaryFile(dir=workdir):
        pass
  except ImportError as e:  # Nothing to reach gs:// with.
    cli.fail(f'--workdir={workdir}: {e} (pip install -e \'.[tpu]\' brings it).')
  except OSError as e:
    cli.fail(f'--workdir={workdir} is not a writable directory ({cli.one_line(e)}); choose another --workdir or '
             'make it writable.')


def _dry_run():
  from train import compute, memory
  import jax
  if _HARDWARE.value and _HARDWARE.value not in memory.DEVICE_BYTES:  # Before minutes of compiling.
    cli.fail(f'--hardware={_HARDWARE.value!r} is unknown; choose one of {sorted(memory.DEVICE_BYTES)}.')
  with cli.ending_failures(_TRACEBACK.value):
    hardware = _HARDWARE.value or compute.detect_hardware(jax.devices()[0])
    print(memory.report(memory.account(_CONFIG.value), hardware if hardware in memory.DEVICE_BYTES else None),
          flush=True)


def main(argv):
  del argv
  if _DRY_RUN.value:
    return _dry_run()
  _check_workdir(_WORKDIR.value)
  from train import distributed
  try:  # Before anything starts a JAX backend.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    cli.fail(e)
  import tensorflow_datasets as tfds
  from train import loop  # After flag parsing, so --help is fast and errors come first.
  tfds.disable_progress_bar()
  with cli.ending_failures(_TRACEBACK.value):
    result = loop.train(_CONFIG.value, _WORKDIR.value)
  distributed.shutdown()
  if result['preempted']:
    sys.exit(cli.PREEMPTED_EXIT)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
