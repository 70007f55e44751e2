"""The workdir lock (one run at a time, a gone holder's lock taken over) and atomic record writes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from train import loop, workdir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _holder(path):
  with open(os.path.join(path, workdir.LOCK_NAME)) as f:
    return json.load(f)


def test_write_atomically_replaces_whole_and_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / 'config.json')
  workdir.write_atomically(path, '{"a": 1}')
  workdir.write_atomically(path, '{"a": 2}')
  with pytest.raises(TypeError):  # Fails while writing: the old text stays.
    workdir.write_atomically(path, None)
  assert os.listdir(tmp_path) == ['config.json']
  assert (tmp_path / 'config.json').read_text() == '{"a": 2}'
  (tmp_path / 'plain').write_text('')  # The mode an ordinary write gives, not a private temp file's.
  assert os.stat(path).st_mode == os.stat(tmp_path / 'plain').st_mode


def test_a_second_holder_is_refused_in_one_line_naming_host_and_pid(tmp_path):
  with workdir.Lock(str(tmp_path)):
    holder = _holder(tmp_path)
    assert (holder['host'], holder['pid']) == (socket.gethostname(), os.getpid())
    with pytest.raises(workdir.WorkdirLockedError) as e:
      workdir.Lock(str(tmp_path)).acquire()
    assert _holder(tmp_path) == holder  # Untouched by the refused run.
  message = str(e.value)
  assert '\n' not in message
  assert f'{tmp_path} is in use by another run (pid {os.getpid()} on host {socket.gethostname()} since ' in message
  assert 'wait for it to end or stop it' in message
  assert not os.path.exists(tmp_path / 'lock')  # Released.
  with workdir.Lock(str(tmp_path)):  # And free again.
    pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
  script = ('import sys, time; from train import workdir; workdir.Lock(sys.argv[1]).acquire(); '
            'print("locked", flush=True); time.sleep(600)')
  holder = subprocess.Popen([sys.executable, '-c', script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir.WorkdirLockedError, match=f'pid {holder.pid} on host'):
      workdir.Lock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert _holder(tmp_path)['pid'] == holder.pid  # kill -9 left it behind.
  with workdir.Lock(str(tmp_path)):
    assert _holder(tmp_path)['pid'] == os.getpid()
  (note,) = capsys.readouterr().out.splitlines()
  assert note == (f'note: took over the lock of {tmp_path} from a run that is gone (pid {holder.pid} on '
                  f'{socket.gethostname()} is not running).')


def _write_lock(path, **record):
  (path / workdir.LOCK_NAME).write_text(json.dumps(record))


def test_a_reused_pid_or_a_stale_heartbeat_from_another_host_is_taken_over(tmp_path, capsys):
  # This very pid, but a process that started at another time: the holder is gone, its pid reused.
  _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start='1', heartbeat=time.time())
  with workdir.Lock(str(tmp_path)):
    pass
  assert 'is now another process' in capsys.readouterr().out
  # Another host (a pod host replaced after a crash): only its heartbeat tells.
  _write_lock(tmp_path, host='gone-host', pid=1, heartbeat=time.time() - workdir.STALE_AFTER_S - 5)
  with workdir.Lock(str(tmp_path)):
    assert _holder(tmp_path)['host'] == socket.gethostname()
  assert 'its heartbeat is' in capsys.readouterr().out
  _write_lock(tmp_path, host='busy-host', pid=1, heartbeat=time.time() - 10)
  with pytest.raises(workdir.WorkdirLockedError, match='pid 1 on host busy-host'):
    workdir.Lock(str(tmp_path)).acquire()


def test_the_heartbeat_is_refreshed_while_held(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir, 'HEARTBEAT_S', 0.05)
  with workdir.Lock(str(tmp_path)):
    first = _holder(tmp_path)['heartbeat']
    deadline = time.time() + 10
    while _holder(tmp_path)['heartbeat'] == first:
      assert time.time() < deadline, 'the heartbeat was never refreshed'
      time.sleep(0.05)


def test_released_when_the_run_fails(tmp_path, digits_dir, tiny_config):
  with pytest.raises(RuntimeError):
    with workdir.Lock(str(tmp_path)):
      raise RuntimeError('boom')
  assert not os.path.exists(tmp_path / 'lock')
  with pytest.raises(ValueError, match='total_steps=0 must be positive'):
    loop.train(tiny_config(digits_dir, total_steps=0), str(tmp_path))
  assert not os.path.exists(tmp_path / 'lock')
  other_process = workdir.Lock(str(tmp_path), enabled=False)  # Processes other than 0 take none.
  other_process.acquire()
  assert not other_process.held and not os.path.exists(tmp_path / 'lock')
