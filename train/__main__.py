"""Command line: python -m train --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.key=value ...]

Exit status: 0 once the run has reached total_steps; 75 (PREEMPTED_EXIT) when a preemption notice stopped it
after saving, so that a restart loop (train.launch's) reruns the same command, which resumes; 3 for a non-finite
loss; 2 for bad input (an unknown override, a missing dataset, a mesh or batch that does not fit the devices),
which ends the run at start-up with one line on stderr saying what is wrong and what to do.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import PREEMPTED_EXIT

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :ARGS.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl (resumed if present).')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show full tracebacks for configuration errors.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 in a multi-process run '
                                   '(default $JAX_COORDINATOR_ADDRESS; TPU slices are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (default $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1 '
                                   '(default $JAX_PROCESS_ID).')


def _fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _parse(argv):
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if 'Traceback' in text:  # An exception inside the config file: keep its final 'SomeError: ...' line.
      text = 'the config file failed: ' + text.strip().splitlines()[-1]
    _fail(f'{" ".join(text.split())} (see --helpfull)')
  except (KeyError, AttributeError) as e:  # config_flags' way of saying an override names no field.
    key = str(e).strip('"\'')
    bad = [a for a in argv if a.startswith('--config.') and key in a.split('=')[0]]
    _fail(f'{bad[0].split("=")[0] if bad else key}: no such config field; check the spelling against the config '
          'file (new fields must be added to the config, not only overridden)')
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config=configs/vit_digits.py')
  try:  # The config file is loaded lazily: surface a missing or broken file here, as one line.
    list(_CONFIG.value.keys())
  except Exception as e:  # noqa: BLE001 - any failure of the user's config file.
    cause = e.__cause__ or e
    first = next((l.strip() for l in str(cause).splitlines() if l.strip().startswith('[Errno')), None)
    _fail(f'cannot load --config={flags.FLAGS["config"].serialize().split("=", 1)[1]}: '
          f'{first or " ".join(str(cause).split())}')
  if not _WORKDIR.value:
    _fail('--workdir is required: the directory for checkpoints and metrics (resumed if it has any).')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO chatter would drown the progress lines.
  return rest


def main(argv):
  del argv
  from train import distributed
  try:  # Before anything starts a JAX backend.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    _fail(str(e))
  from etils import epath
  import tensorflow_datasets as tfds
  from train import loop  # After flag parsing, so --help is fast and errors come first.
  tfds.disable_progress_bar()
  try:
    epath.Path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
  except ImportError as e:  # Nothing to reach gs:// with.
    _fail(f'--workdir={_WORKDIR.value}: {e} (pip install -e \'.[tpu]\' brings it).')
  except OSError as e:
    _fail(f'cannot create --workdir={_WORKDIR.value}: {" ".join(str(e).split())}')
  try:
    result = loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    _fail(str(e), code=3)
  except (ValueError, FileNotFoundError) as e:
    if _TRACEBACK.value:
      raise
    _fail(f'{" ".join(str(e).split())} (--traceback for details)')
  distributed.shutdown()
  if result['preempted']:
    sys.exit(PREEMPTED_EXIT)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
