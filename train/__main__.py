"""Command line: python -m train --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.key=value ...]

Bad input (an unknown override, a missing dataset, a mesh or batch that does not fit the devices) ends the
run at start-up with one line on stderr saying what is wrong and what to do; exit status 2.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :ARGS.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.jsonl (resumed if present).')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show full tracebacks for configuration errors.')


def _fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _parse(argv):
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{" ".join(str(e).split())} (see --helpfull)')
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config=configs/vit_digits.py')
  if not _WORKDIR.value:
    _fail('--workdir is required: the directory for checkpoints and metrics (resumed if it has any).')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Library INFO chatter would drown the progress lines.
  return rest


def main(argv):
  del argv
  import tensorflow_datasets as tfds
  from train import loop  # After flag parsing, so --help is fast and errors come first.
  tfds.disable_progress_bar()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    _fail(str(e), code=3)
  except (ValueError, FileNotFoundError) as e:
    if _TRACEBACK.value:
      raise
    _fail(f'{" ".join(str(e).split())} (--traceback for details)')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
