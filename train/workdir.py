"""What keeps a workdir consistent besides its checkpoints: the lock that keeps a second run out, and atomic
writes of its records (config.json).

The lock is WORKDIR/lock, a JSON record {host, pid, start (the pid's start time), since, heartbeat, token}, taken
by process 0 alone (a multi-host run locks once):
  - locally it is created with O_CREAT|O_EXCL, so of two runs starting together exactly one gets it;
  - on gs:// it is checked, then written: epath offers no create-if-absent there, so two runs starting within
    the same second can both get it; every later start is refused.
A lock whose holder is gone is taken over, with a one-line note. On the holder's host the pid decides: gone,
a zombie, or alive with another start time (the pid was reused). Seen from another host (a dead pod host's
successor has another name), the heartbeat decides: a live holder refreshes it every HEARTBEAT_S, and one
older than STALE_AFTER_S is a dead holder's.
"""
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from train import paths

LOCK_NAME = 'lock'
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # Ten missed heartbeats: a live holder (even busy compiling) is never this late.


class WorkdirLockedError(ValueError):
  """Another live run holds the workdir."""


def write_atomically(path: str, text: str) -> None:
  """Replaces the file `path` with `text` whole: readers see the old or the new text, never a part."""
  if paths.is_url(path):  # An object upload replaces it whole.
    epath.Path(path).write_text(text)
    return
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f'.{name}.{uuid.uuid4().hex}.tmp')  # Same directory: os.replace stays a rename.
  try:
    with open(tmp, 'x') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _proc_start(pid: int) -> str | None:
  """The start time of a running pid (clock ticks since boot, /proc/PID/stat field 22); None if it is not
  running or is a zombie (killed, not yet reaped)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rpartition(')')[2].split()  # The command name may hold spaces and parentheses.
  except OSError:
    return None
  return None if fields[0] in 'ZX' else fields[19]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def _gone(holder: dict, age_s: float) -> str | None:
  """Why the holder of a lock is gone, or None when it may be alive; `age_s`: seconds since its heartbeat."""
  pid, host = holder.get('pid'), holder.get('host')
  if host == socket.gethostname() and isinstance(pid, int):
    if os.path.exists('/proc/self/stat'):
      start = _proc_start(pid)
      if start is None:
        return f'pid {pid} on {host} is not running'
      if holder.get('start') not in (None, start):
        return f'pid {pid} on {host} is now another process'
      return None
    if not _alive(pid):
      return f'pid {pid} on {host} is not running'
    return None
  if age_s > STALE_AFTER_S:
    return f'its heartbeat is {age_s:.0f} s old'
  return None


class Lock:
  """WORKDIR/lock while a run trains there; a context manager (released on every exit), or acquire()/release().

  `enabled=False` (processes other than 0) makes it do nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(paths.absolute(workdir), LOCK_NAME)
    self.enabled = enabled
    self.held = False
    self._token = uuid.uuid4().hex
    self._since = None
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _record(self) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'start': _proc_start(os.getpid()),
                       'since': self._since, 'heartbeat': time.time(), 'token': self._token})

  def _read(self) -> tuple[str, dict, float] | None:
    """(text, record, seconds since its heartbeat) of the lock file, None if there is none."""
    file = epath.Path(self.path)
    try:
      text = file.read_text()
      modified = file.stat().mtime
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      holder = holder if isinstance(holder, dict) else {}
    except ValueError:  # Being written this instant, or torn by a crash: its file time stands in.
      holder = {}
    heartbeat = holder.get('heartbeat')
    return text, holder, time.time() - (heartbeat if isinstance(heartbeat, (int, float)) else modified)

  def _refuse(self, holder: dict):
    who = f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")}'
    since = holder.get('since')
    since = f' since {time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))}' if since else ''
    raise WorkdirLockedError(
        f'{os.path.dirname(self.path)} is in use by another run ({who}{since}); wait for it to end or stop it, '
        f'or use another --workdir (if that run is gone, delete {self.path}).')

  def acquire(self) -> None:
    if not self.enabled or self.held:
      return
    self._since = time.time()
    for _ in range(5):  # Only runs racing to take over one stale lock go round again.
      if self._try_create():
        break
      found = self._read()
      if found is None:  # Released meanwhile.
        continue
      text, holder, age = found
      why = _gone(holder, age)
      if why is None:
        self._refuse(holder)
      if self._take_over(text):
        print(f'note: took over the lock of {os.path.dirname(self.path)} from a run that is gone ({why}).',
              flush=True)
        break
    else:
      self._refuse((self._read() or ('', {}, 0))[1])
    self.held = True
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, name='workdir-lock-heartbeat', daemon=True)
    self._heartbeat.start()

  def _try_create(self) -> bool:
    if paths.is_url(self.path):
      if epath.Path(self.path).exists():
        return False
      epath.Path(self.path).write_text(self._record())
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(self._record())
      f.flush()
      os.fsync(f.fileno())
    return True

  def _take_over(self, stale_text: str) -> bool:
    """Replaces the stale lock `stale_text` by ours; False when another run changed it first."""
    if paths.is_url(self.path):
      epath.Path(self.path).write_text(self._record())
      return True
    # Renamed aside first, atomically: of several runs taking over, one moves the stale lock, and a run that
    # moved a fresh lock instead (taken over a moment before) puts it back.
    aside = f'{self.path}.{self._token}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    with open(aside) as f:
      moved = f.read()
    if moved != stale_text:
      os.rename(aside, self.path)
      return False
    os.unlink(aside)
    return self._try_create()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        found = self._read()
        if found is None or found[1].get('token') != self._token:
          print(f'warning: the lock {self.path} is no longer this run\'s; another run may be writing here.',
                file=sys.stderr, flush=True)
          return
        write_atomically(self.path, self._record())
      except OSError:  # A full disk or a network blip: the next beat tries again.
        pass

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this run's; safe to call more than once."""
    if not self.held:
      return
    self.held = False
    self._stop.set()
    if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
      self._heartbeat.join(timeout=5)
    with contextlib.suppress(OSError):
      found = self._read()
      if found is not None and found[1].get('token') == self._token:
        epath.Path(self.path).unlink()
