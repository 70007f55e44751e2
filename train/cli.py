"""What the commands of train/ share: their exit statuses, one-line errors and the reading of --config.

Every command (`python -m train`, train.sweep, train.analyze, train.launch, train.convert, train.sample) ends
a failure with one `error: ...` line on stderr (a full traceback only with --traceback) and one of these exit
statuses, so that a person sees what to fix and a restart loop (train.launch's) knows what to retry:

  0   done
  1   an unexpected error (a bug): the line names the exception; --traceback shows where       retried
  2   BAD_INPUT_EXIT: a bad flag or config, a missing file, a workdir in use or unreadable    not retried
  3   NON_FINITE_EXIT: a non-finite loss, which a resumed run would repeat exactly            not retried
  74  TRANSIENT_IO_EXIT: an I/O failure (a full disk, a network filesystem error)             retried
  75  PREEMPTED_EXIT: stopped by a preemption notice (or Ctrl-C) after saving                 retried
  130 INTERRUPTED_EXIT: Ctrl-C at start-up, or a second Ctrl-C; nothing more was saved        retried
"""
import ast
import contextlib
import errno
import re
import sys
import traceback
from typing import NoReturn

from absl import flags, logging

BAD_INPUT_EXIT = 2  # An unknown override, a missing file, a mesh that does not fit: fix it, do not retry.
NON_FINITE_EXIT = 3  # A non-finite loss: a resumed run would repeat it exactly.
# An OSError while running (a full disk during a save, a network filesystem error): sysexits' EX_IOERR. The
# checkpoints before it are intact, so rerunning the same command resumes once the storage is back.
TRANSIENT_IO_EXIT = 74
# Stopped by a preemption notice after saving: sysexits' EX_TEMPFAIL, so that a restart loop reruns the same
# command, which resumes.
PREEMPTED_EXIT = 75
UNEXPECTED_EXIT = 1
# Ctrl-C at start-up, or a second Ctrl-C while the loop saves: the shell's convention, 128 + SIGINT.
INTERRUPTED_EXIT = 130

# OSErrors (and their errnos) that name a wrong path rather than flaky storage: rerunning would fail the same
# way. Any other (a full disk, EIO, a stale NFS handle, a timeout) is worth a rerun.
_BAD_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_BAD_PATH_ERRNOS = (errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS)
_STORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
_MAX_LINE = 2000  # Characters of an error line: a message that quotes a whole tree would flood the terminal.


def one_line(text) -> str:
  """`text` with its line breaks and runs of blanks as single spaces."""
  return ' '.join(str(text).split())


def fail(message, code: int = BAD_INPUT_EXIT) -> NoReturn:
  """Ends the command with `error: MESSAGE` (made one line) on stderr and exit status `code`."""
  _quiet_abandoned_work()
  line = one_line(message)
  if len(line) > _MAX_LINE:
    line = line[:_MAX_LINE - 5] + ' ...'
  print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(code)


def _os_error(error: BaseException) -> OSError | None:
  """`error`, or the first of its explicit causes (`raise ... from`), that is an OSError: libraries wrap the
  OSError of a failed write (orbax a save's) in their own exception."""
  while error is not None and not isinstance(error, OSError):
    error = error.__cause__
  return error


def _store_errno(error: BaseException) -> int | None:
  """The errno in a tensorstore error (orbax writes and reads arrays with it), which arrives as a ValueError
  whose text ends "... File too large [os_error_code='27']"."""
  found = _STORE_ERRNO.search(str(error)) if isinstance(error, ValueError) else None
  return int(found[1]) if found else None


def exit_status(error: BaseException) -> int:
  """The exit status (see the module docstring) of a command ended by `error`."""
  if isinstance(error, FloatingPointError):  # NonFiniteLossError, or jax_debug_nans' own.
    return NON_FINITE_EXIT
  os_error, store_errno = _os_error(error), _store_errno(error)
  if os_error is not None:
    bad_path = isinstance(os_error, _BAD_PATH_ERRORS) or os_error.errno in _BAD_PATH_ERRNOS
    return BAD_INPUT_EXIT if bad_path else TRANSIENT_IO_EXIT
  if store_errno is not None:
    return BAD_INPUT_EXIT if store_errno in _BAD_PATH_ERRNOS else TRANSIENT_IO_EXIT
  return BAD_INPUT_EXIT if isinstance(error, ValueError) else UNEXPECTED_EXIT


def summary(error: BaseException) -> str:
  """The `error:` line's message for `error`, saying what to do for its exit status."""
  code, text = exit_status(error), one_line(error)
  if code == TRANSIENT_IO_EXIT:
    return (f'{one_line(_os_error(error) or error)}: an I/O failure (a full disk, an unreachable filesystem); once the '
            'storage is back, rerun the same command to resume from the last checkpoint')
  if code == UNEXPECTED_EXIT:
    return f'unexpected {type(error).__name__}: {text or "(no message)"} (--traceback shows where)'
  return text if code == NON_FINITE_EXIT else f'{text} (--traceback for details)'


@contextlib.contextmanager
def ending_failures(show_traceback: bool = False):
  """Inside the block, any exception ends the command as fail(summary(e), exit_status(e)), after its
  traceback when `show_traceback`."""
  try:
    yield
  except KeyboardInterrupt:  # Ctrl-C before the loop's own handler is set (start-up, restore, compilation).
    if show_traceback:
      traceback.print_exc()
    fail('interrupted (Ctrl-C) before the first step; nothing was saved. Rerun the same command to start again.',
         INTERRUPTED_EXIT)
  except Exception as e:  # noqa: BLE001 - every failure ends as one line with its documented status.
    if show_traceback:
      traceback.print_exc()
    fail(summary(e), exit_status(e))


def _quiet_abandoned_work() -> None:
  """A failed asynchronous save leaves coroutines that were never awaited; Python would report each at exit,
  after the error line, though nothing can be done about them."""
  import warnings
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited', category=RuntimeWarning)


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
  if 'traceback' not in flags.FLAGS:
    flags.DEFINE_bool('traceback', False, 'Show the full traceback of an error before its one line.',
                      module_name=command.__name__)
  for flag in flags.FLAGS.get_key_flags_for_module(command):  # What --help (--helpshort) lists.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def main(argv):
    with ending_failures(flags.FLAGS.traceback):
      return command.main(argv)

  app.run(main)


def no_arguments(argv, advice: str = '') -> None:
  """Fails on positional arguments after the program name (absl leaves them in argv)."""
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}' + (f'; {advice}' if advice else ''))


def _without_traceback(record) -> bool:
  return record.exc_info is None


def quiet_logging() -> None:
  """Library INFO chatter would drown a command's own lines: WARNING and above, unless --verbosity is given.
  Nor are the tracebacks that libraries log on their way to raising shown (orbax logs a failed save four times
  in 300 lines, asyncio its unretrieved tasks at exit), unless --verbosity or --traceback is given: the
  exception reaches the command, which ends with its one line."""
  if flags.FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  if not ('traceback' in flags.FLAGS and flags.FLAGS.traceback):  # On the handler: asyncio logs to its own logger.
    logging.get_absl_handler().addFilter(_without_traceback)


# How config_flags reports what went wrong, turned into the part of a one-line error that says it.

def _failed_config_file(text: str) -> str | None:
  """The final 'SomeError: ...' line of an exception raised inside the config file, which absl's error text
  carries as a traceback; None when the text holds none."""
  return text.strip().splitlines()[-1] if 'Traceback' in text else None


def _unknown_field(error: Exception, overrides) -> tuple[str | None, str | None, str]:
  """What config_flags' KeyError or AttributeError says: (the override '--config.KEY...' that names no field,
  the one likely meant, e.g. '--config.model_name', when ConfigDict offers a near miss, its own words); the
  override is None when none names KEY (one that indexes into a number, say)."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  if text[:1] in '"\'' and '\\n' in text:  # A KeyError's repr (str(KeyError)) escapes its line breaks.
    with contextlib.suppress(ValueError, SyntaxError):
      text = ast.literal_eval(text)
  key = text.splitlines()[0].strip('"\'') if text else ''
  for name in (o.split('=')[0] for o in overrides):
    parts = name.split('.')
    if key in parts[1:]:
      near = re.search(r'Did you mean "([^"]+)" instead of', text)
      if near:
        parts[parts.index(key, 1)] = near[1]
      return name, ('.'.join(parts) if near else None), one_line(text)
  return None, None, one_line(text)


def _config_file_failure(error: BaseException, flag_name: str) -> str | None:
  """What went wrong inside the config file itself (config_flags loads it as the module FLAG_config and lets
  a SyntaxError, an ImportError or a missing get_config escape raw), as 'FILE, line N: Error: message';
  None when the error did not come from the file."""
  if isinstance(error, SyntaxError):  # Also an IndentationError.
    return f'{error.filename}, line {error.lineno}: {type(error).__name__}: {error.msg}'
  obj = getattr(error, 'obj', None)
  if isinstance(error, AttributeError) and getattr(error, 'name', None) == 'get_config' and hasattr(obj, '__file__'):
    return (f'{obj.__file__} defines no get_config(); a config file defines get_config(arg=None) that returns its '
            'ConfigDict')
  where, tb = None, error.__traceback__
  while tb is not None:  # The innermost line of the file: its failing statement.
    if tb.tb_frame.f_globals.get('__name__') == f'{flag_name}_config':
      where = f'{tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno}'
    tb = tb.tb_next
  return f'{where}: {type(error).__name__}: {one_line(error)}' if where else None


def _errno_line(error: BaseException) -> str | None:
  """The '[Errno N] ...' line of an error that failed to open a file, if it has one."""
  return next((l.strip() for l in str(error).splitlines() if l.strip().startswith('[Errno')), None)


def _forget_config_module(flag_name: str) -> None:
  """config_flags loads every config file as the module FLAG_config, through a loader that reruns a new file
  inside the module object of the last one: a file without get_config would get the last file's."""
  sys.modules.pop(f'{flag_name}_config', None)


def parse_flags(argv, config, flag_values: flags.FlagValues = flags.FLAGS,
                example: str = 'configs/vit_digits.py') -> list[str]:
  """Parses argv into `flag_values`, which define `config` (a DEFINE_config_file flag), and loads the config
  file; returns the arguments left over. A bad flag, an override of no field, a missing --config or a config
  file that cannot be loaded ends the command with one `error:` line (fail) instead of absl's traceback."""
  _forget_config_module(config.name)
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    failed = _failed_config_file(str(e))
    fail(f'{one_line(f"the config file failed: {failed}" if failed else e)} (see --helpfull)')
  except Exception as e:  # noqa: BLE001 - the config file's own code fails in any way.
    failed = _config_file_failure(e, config.name)
    if failed:
      fail(f'the config file failed: {failed}')
    if isinstance(e, ValueError):  # config_flags' own complaint about an override, e.g. an unparsable path.
      fail(e)
    if not isinstance(e, (KeyError, AttributeError)):
      raise
    # config_flags' way of saying an override names no field.
    name, meant, text = _unknown_field(e, [a for a in argv if a.startswith((f'--{config.name}.',
                                                                             f'--no{config.name}.'))])
    if name is None:
      fail(f'{text}; check the --{config.name}.* overrides against the config file')
    fail(f'{name}: no such config field; ' + (f'did you mean {meant}? ' if meant else 'check the spelling against '
         'the config file ') + '(new fields must be added to the config, not only overridden)')
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
  _forget_config_module('config')
  try:
    flag_values(argv)
    config = holder.value
    list(config.keys())  # The file is loaded lazily: fail here on a missing or broken one.
  except flags.Error as e:
    failed = _failed_config_file(str(e))
    raise ValueError(one_line(f'--config={spec}: the config file failed: {failed}' if failed else e)) from None
  except OSError as e:
    raise ValueError(f'cannot load --config={spec}: {_errno_line(e) or e} (run from the repository '
                     'root).') from None
  except Exception as e:  # noqa: BLE001 - the config file's own code fails in any way.
    failed = _config_file_failure(e, 'config')
    if failed:
      raise ValueError(f'--config={spec}: the config file failed: {failed}') from None
    if not isinstance(e, (KeyError, AttributeError)):
      raise
    # config_flags' way of saying an override names no field.
    name, meant, text = _unknown_field(e, overrides)
    if name is None:
      raise ValueError(f'{text}; check the --config.* overrides against {spec}.') from None
    raise ValueError(f'{name}: no such field in {spec}; check the spelling against the config '
                     f'file{f" (did you mean {meant}?)" if meant else ""}.') from None
  return config
