"""Command line: python -m train --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.key=value ...]

Exit status: 0 once the run has reached total_steps; 75 (PREEMPTED_EXIT) when a preemption notice stopped it
after saving, so that a restart loop (train.launch's) reruns the same command, which resumes; 3 for a non-finite
loss; 2 for bad input (an unknown override, a missing dataset, a mesh or batch that does not fit the devices),
which ends the run at start-up with one line on stderr saying what is wrong and what to do (train/cli.py
names these statuses and writes that line).
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from train import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :ARGS.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl (resumed if present).')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show full tracebacks for configuration errors.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 in a multi-process run '
                                   '(default $JAX_COORDINATOR_ADDRESS; TPU slices are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (default $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1 '
                                   '(default $JAX_PROCESS_ID).')


def _parse(argv):
  rest = cli.parse_flags(argv, _CONFIG, example='configs/vit_digits.py')
  if not _WORKDIR.value:
    cli.fail('--workdir is required: the directory for checkpoints and metrics (resumed if it has any).')
  cli.quiet_logging()  # Library INFO chatter would drown the progress lines.
  return rest


def main(argv):
  del argv
  from train import distributed
  try:  # Before anything starts a JAX backend.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    cli.fail(e)
  from etils import epath
  import tensorflow_datasets as tfds
  from train import loop  # After flag parsing, so --help is fast and errors come first.
  tfds.disable_progress_bar()
  try:
    epath.Path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
  except ImportError as e:  # Nothing to reach gs:// with.
    cli.fail(f'--workdir={_WORKDIR.value}: {e} (pip install -e \'.[tpu]\' brings it).')
  except OSError as e:
    cli.fail(f'cannot create --workdir={_WORKDIR.value}: {cli.one_line(e)}')
  try:
    result = loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    cli.fail(e, code=cli.NON_FINITE_EXIT)
  except (ValueError, FileNotFoundError) as e:
    if _TRACEBACK.value:
      raise
    cli.fail(f'{cli.one_line(e)} (--traceback for details)')
  distributed.shutdown()
  if result['preempted']:
    sys.exit(cli.PREEMPTED_EXIT)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
