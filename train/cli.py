"""What the commands of train/ share: their exit statuses, one-line errors and the reading of --config.

Every command (`python -m train`, train.sweep, train.analyze, train.launch, train.convert, train.sample) ends
bad input with one `error: ...` line on stderr and BAD_INPUT_EXIT, so that a person sees what to fix and a
restart loop (train.launch's) knows not to retry it.
"""
import contextlib
import sys
from typing import NoReturn

from absl import flags, logging

BAD_INPUT_EXIT = 2  # An unknown override, a missing file, a mesh that does not fit: fix it, do not retry.
NON_FINITE_EXIT = 3  # A non-finite loss: a resumed run would repeat it exactly.
# Stopped by a preemption notice after saving: sysexits' EX_TEMPFAIL, so that a restart loop reruns the same
# command, which resumes.
PREEMPTED_EXIT = 75


def one_line(text) -> str:
  """`text` with its line breaks and runs of blanks as single spaces."""
  return ' '.join(str(text).split())


def fail(message, code: int = BAD_INPUT_EXIT) -> NoReturn:
  """Ends the command with `error: MESSAGE` on stderr and exit status `code`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def failing_on(*errors: type[BaseException], code: int = BAD_INPUT_EXIT):
  """Inside the block, an exception of one of `errors` ends the command as fail(str(exception), code)."""
  try:
    yield
  except errors as e:
    fail(e, code)


def run(command) -> NoReturn:
  """Runs a command module written for absl as the program: defines its flags (its define_flags(); such a
  module defines none when imported, so that importing several defines nothing twice) and calls its
  main(argv) through absl's app.run. --help shows the module's docstring and flags even when it was started
  through another module's name (`python -m train.sweep` runs train/study/sweep.py this way)."""
  from absl import app
  sys.modules['__main__'].__doc__ = command.__doc__  # What absl's usage message prints.
  command.define_flags()
  for flag in flags.FLAGS.get_key_flags_for_module(command):  # What --help (--helpshort) lists.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(command.main)


def no_arguments(argv, advice: str = '') -> None:
  """Fails on positional arguments after the program name (absl leaves them in argv)."""
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}' + (f'; {advice}' if advice else ''))


def quiet_logging() -> None:
  """Library INFO chatter would drown a command's own lines: WARNING and above, unless --verbosity is given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


# How config_flags reports what went wrong, turned into the part of a one-line error that says it.

def _failed_config_file(text: str) -> str | None:
  """The final 'SomeError: ...' line of an exception raised inside the config file, which absl's error text
  carries as a traceback; None when the text holds none."""
  return text.strip().splitlines()[-1] if 'Traceback' in text else None


def _unknown_field(error: Exception, overrides) -> tuple[str, str | None]:
  """(the --config.KEY override that names no field, or the bare key when none matches; a hint such as
  'Did you mean ...?' when there is one) of config_flags' KeyError or AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
    error = error.args[0]
  key, *hint = str(error.args[0] if error.args else error).splitlines()
  key = key.strip('"\'')
  names = [o.split('=')[0] for o in overrides]
  bad = [n for n in names if key in n.split('.')[1:]]
  return (bad[0] if bad else key), (hint[0] if hint else None)


def _errno_line(error: BaseException) -> str | None:
  """The '[Errno N] ...' line of an error that failed to open a file, if it has one."""
  return next((l.strip() for l in str(error).splitlines() if l.strip().startswith('[Errno')), None)


def parse_flags(argv, config, flag_values: flags.FlagValues = flags.FLAGS,
                example: str = 'configs/vit_digits.py') -> list[str]:
  """Parses argv into `flag_values`, which define `config` (a DEFINE_config_file flag), and loads the config
  file; returns the arguments left over. A bad flag, an override of no field, a missing --config or a config
  file that cannot be loaded ends the command with one `error:` line (fail) instead of absl's traceback."""
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    failed = _failed_config_file(str(e))
    fail(f'{one_line(f"the config file failed: {failed}" if failed else e)} (see --helpfull)')
  except (KeyError, AttributeError) as e:  # config_flags' way of saying an override names no field.
    name, _ = _unknown_field(e, [a for a in argv if a.startswith(f'--{config.name}.')])
    fail(f'{name}: no such config field; check the spelling against the config file (new fields must be added '
         'to the config, not only overridden)')
  if config.value is None:
    fail(f'--{config.name} is required, e.g. --{config.name}={example}')
  try:  # The config file is loaded lazily: surface a missing or broken file here, as one line.
    list(config.value.keys())
  except Exception as e:  # noqa: BLE001 - any failure of the user's config file.
    cause = e.__cause__ or e
    fail(f'cannot load {flag_values[config.name].serialize()}: {_errno_line(cause) or one_line(cause)}')
  return rest


def load_config(spec: str, overrides=()):
  """The config of --config=FILE.py[:ARGS] with --config.key=value overrides, parsed as `python -m train` does;
  ValueError with one line saying what is wrong when it cannot be loaded or an override names no field."""
  from ml_collections import config_flags
  argv = ['launch', f'--config={spec}', *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
    config = holder.value
    list(config.keys())  # The file is loaded lazily: fail here on a missing or broken one.
  except flags.Error as e:
    failed = _failed_config_file(str(e))
    raise ValueError(one_line(f'--config={spec}: the config file failed: {failed}' if failed else e)) from None
  except (KeyError, AttributeError) as e:  # config_flags' way of saying an override names no field.
    name, hint = _unknown_field(e, overrides)
    raise ValueError(f'{name}: no such field in {spec}; check the spelling against the config '
                     f'file{f" ({hint})" if hint else ""}.') from None
  except OSError as e:
    raise ValueError(f'cannot load --config={spec}: {_errno_line(e) or e} (run from the repository '
                     'root).') from None
  return config
