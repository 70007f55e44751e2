"""Two processes x 2 CPU devices on loopback train exactly like one process x 4 devices, and resume after kill -9."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import distributed
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240
# A tiny ViT; SGD, not Adam, for the same reason as in test_loop's mesh comparison: the key bias's gradient
# is exactly zero, and Adam would blow its rounding noise (here cross-process sums) up to full-size updates.
FLAGS = ('--config=configs/vit_digits.py', '--config.model.width=16', '--config.model.depth=2',
         '--config.model.mlp_dim=32', '--config.model.num_heads=2', '--config.model.patch_size=4',
         '--config.batch_size=32', '--config.eval_batch_size=32', '--config.total_steps=32',
         '--config.log_every_steps=1', '--config.eval_every_steps=32', '--config.checkpoint_every_steps=8',
         '--config.schedule.warmup_steps=2', '--config.optimizer.name=sgd',
         '--config.schedule.base_learning_rate=0.1', '--config.mesh.data=-1')
NUM_DEVICES = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Runs:
  """Starts runs of `python -m train` as NUM_DEVICES CPU devices over `num_processes` processes."""

  def __init__(self, data_dir, cache_dir):
    self.data_dir, self.cache_dir = data_dir, cache_dir
    self.started = []

  def start(self, workdir, num_processes):
    port = _free_port()
    # Start-up is mostly XLA compilation: unoptimised code (every run alike) and a shared cache, which on
    # CPU only process 0 can use (the other processes' cache keys hold their own devices).
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(NUM_DEVICES // num_processes),
               XLA_FLAGS='--xla_backend_optimization_level=0', JAX_COMPILATION_CACHE_DIR=self.cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    procs = []
    for p in range(num_processes):
      cmd = [sys.executable, '-m', 'train', *FLAGS, f'--workdir={workdir}', f'--config.data.data_dir={self.data_dir}']
      if num_processes > 1:
        cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}', f'--process_id={p}']
      with open(f'{workdir}.{p}.log', 'a') as log:
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    self.started += procs
    return procs

  def wait(self, procs, workdir):
    deadline = time.time() + TIMEOUT_S
    for p, proc in enumerate(procs):
      returncode = proc.wait(timeout=max(1, deadline - time.time()))
      assert returncode == 0, f'process {p} exited with {returncode}:\n{_log(workdir, p)[-3000:]}'

  def kill_all(self):
    for proc in self.started:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _log(workdir, p):
  with open(f'{workdir}.{p}.log') as f:
    return f.read()


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k == 'step' or k.startswith(('train/', 'eval/'))}
          for r in metrics_lib.read_metrics(str(workdir))]


def _params(workdir, step=32):
  """The checkpoint's parameters as numpy arrays, whatever devices saved them."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.device_get(checkpointer.restore(path, target)['trainable'])


@pytest.fixture(scope='module')
def runs(digits_dir, tmp_path_factory):
  runs = _Runs(digits_dir, str(tmp_path_factory.mktemp('jax_cache')))
  try:
    yield runs
  finally:
    runs.kill_all()


@pytest.fixture(scope='module')
def uninterrupted(runs, tmp_path_factory):
  """Workdirs of the same run on 1 process x 4 devices and on 2 processes x 2 devices."""
  root = tmp_path_factory.mktemp('multihost')
  one, two = str(root / 'one'), str(root / 'two')
  started = [(one, runs.start(one, 1)), (two, runs.start(two, 2))]
  for workdir, procs in started:
    runs.wait(procs, workdir)
  return one, two


def test_two_processes_train_like_one(uninterrupted):
  one, two = uninterrupted
  m1, m2 = _metrics(one), _metrics(two)
  assert [r['step'] for r in m2] == list(range(1, 33))
  losses_1 = np.array([r['train/loss'] for r in m1])
  losses_2 = np.array([r['train/loss'] for r in m2])
  print(f'max |loss difference|, 2 vs 1 process: {np.max(np.abs(losses_2 - losses_1)):.3g}')
  np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
  assert m2[-1]['eval/examples'] == m1[-1]['eval/examples'] == 360
  assert m2[-1]['eval/accuracy'] == m1[-1]['eval/accuracy']
  print(f'eval/loss, 2 vs 1 process: {m2[-1]["eval/loss"]!r} vs {m1[-1]["eval/loss"]!r}')
  np.testing.assert_allclose(m2[-1]['eval/loss'], m1[-1]['eval/loss'], rtol=1e-5)
  p1, p2 = _params(one), _params(two)
  print('max |param difference|, 2 vs 1 process: '
        f'{max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p2, p1))):.3g}')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p2, p1)
  # Only process 0 reports; every process saved its own data iterator position.
  assert 'step 32/32' in _log(two, 0) and 'step 32/32' not in _log(two, 1)
  data = os.path.join(two, 'checkpoints', '32', 'data')
  assert sorted(f for f in os.listdir(data) if f.endswith('.json')) == ['process_0-of-2.json', 'process_1-of-2.json']


def test_two_processes_resume_after_kill_like_uninterrupted(runs, uninterrupted, tmp_path):
  _, two = uninterrupted
  killed = str(tmp_path / 'killed')
  victims = runs.start(killed, 2)
  complete = os.path.join(killed, 'checkpoints', '8', '_CHECKPOINT_METADATA')
  deadline = time.time() + TIMEOUT_S
  while not os.path.exists(complete):
    assert all(v.poll() is None for v in victims), 'a process ended before the kill:\n' + _log(killed, 0)[-3000:]
    assert time.time() < deadline, 'no checkpoint at step 8 in time'
    time.sleep(0.02)
  for v in victims:
    v.send_signal(signal.SIGKILL)
  for v in victims:
    v.wait(timeout=30)
  assert not os.path.exists(os.path.join(killed, 'checkpoints', '32')), 'the run finished before the kill'
  runs.wait(runs.start(killed, 2), killed)
  assert 'resumed from' in _log(killed, 0)
  assert _metrics(killed) == _metrics(two)
  jax.tree.map(np.testing.assert_array_equal, _params(killed), _params(two))


def test_resume_with_another_process_count_stops_with_one_line(runs, uninterrupted, tmp_path):
  one, _ = uninterrupted
  moved = str(tmp_path / 'moved')
  shutil.copytree(one, moved)  # Written by 1 process; resumed by 2, each looking for its own data position.
  expected = 'was written by 1 process (a data position each) and resumes only with as many, not 2: rerun with 1'
  for p, proc in enumerate(runs.start(moved, 2)):
    assert proc.wait(timeout=TIMEOUT_S) == 2, _log(moved, p)[-3000:]
    errors = [l for l in _log(moved, p).splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and expected in errors[0], _log(moved, p)[-3000:]


@pytest.mark.parametrize('kwargs, env, message', [
    (dict(num_processes=2, process_id=0), {}, 'missing --coordinator_address'),
    (dict(coordinator_address='127.0.0.1:1234'), {'JAX_NUM_PROCESSES': '2'}, 'missing --process_id'),
    (dict(coordinator_address='localhost', num_processes=2, process_id=0), {}, 'must be HOST:PORT'),
    (dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=2), {}, 'must be in [0, '),
    (dict(coordinator_address='127.0.0.1:1234', process_id=0), {'JAX_NUM_PROCESSES': 'two'}, 'not an integer'),
])
def test_bad_process_settings_raise_one_line(monkeypatch, kwargs, env, message):
  for name in distributed.ENV_VARS.values():
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError) as e:
    distributed.settings(**kwargs)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_process_settings_from_arguments_or_environment(monkeypatch):
  for name in distributed.ENV_VARS.values():
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, '_tpu_slice_detectable', lambda: False)
  assert distributed.settings() is None  # One process, nothing to start.
  assert distributed.settings('127.0.0.1:1234', 1, 0) is None
  monkeypatch.setattr(distributed, '_tpu_slice_detectable', lambda: True)
  assert distributed.settings() == {}  # jax.distributed finds the TPU slice's hosts itself.
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert distributed.settings() == dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)
  assert distributed.settings(process_id=0)['process_id'] == 0


def test_cli_rejects_incomplete_process_settings(digits_dir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS.values()}
  proc = subprocess.run([sys.executable, '-m', 'train', *FLAGS, f'--workdir={tmp_path}', '--num_processes=2',
                         '--process_id=0', f'--config.data.data_dir={digits_dir}'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'missing --coordinator_address' in errors[0], proc.stderr[-2000:]
