"""Fixtures shared by the tests of train/."""
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import mistral_tiny, vit_digits


def _tiny_vit_config(data_dir, **overrides):
  """vit_digits shrunk to a model that compiles and steps in well under a second; `overrides` by dotted name."""
  c = vit_digits.get_config()
  c.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4)
  c.data.data_dir = data_dir
  c.batch_size = c.eval_batch_size = 16
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 1, 0, 3
  c.schedule.warmup_steps = 1
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


@pytest.fixture(scope='session')
def tiny_config():
  """fn(data_dir, **{'dotted.name': value}) -> the tiny digits ViT config (see _tiny_vit_config)."""
  return _tiny_vit_config


@pytest.fixture
def tiny_mistral_config(tmp_path):
  """configs/mistral_tiny.py shrunk to 2 layers of width 32 (window 8, rows of 32 tokens, batch 8), on a small
  corpus written under tmp_path; the caller sets the run's length."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(60):  # Enough files that the hash split gives a validation document.
    (corpus / f'doc{i:02d}.txt').write_text(f'Document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (i % 7 + 3))
  c = mistral_tiny.get_config()
  c.model.update(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                 sliding_window=8, block_size=8)
  c.data.update(files=str(corpus / '*.txt'), data_dir=str(tmp_path / 'tfds'), seq_len=32, num_threads=1, prefetch=1)
  c.batch_size = c.eval_batch_size = 8
  return c


@pytest.fixture
def tiny_mistral_command(tiny_mistral_config):
  """fn({'dotted.name': value}) -> fn(workdir) -> the `python -m train` command line of tiny_mistral_config (its
  shrunk model and corpus as --config overrides; the corpus prepared here once, so that two runs started at once
  do not race to build it): 40 steps, checkpoints every 10, then the given overrides."""
  from data import pipeline, text
  c = tiny_mistral_config
  pipeline.get_source('local_text', 'train', c.data.data_dir, builder_config=text.files_config(c.data.files))
  base = {**{f'model.{k}': c.model[k] for k in ('embed_dim', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                                                 'mlp_dim', 'sliding_window', 'block_size')},
          **{f'data.{k}': c.data[k] for k in ('files', 'data_dir', 'seq_len', 'num_threads', 'prefetch')},
          'batch_size': c.batch_size, 'eval_batch_size': c.eval_batch_size, 'total_steps': 40, 'log_every_steps': 5,
          'eval_every_steps': 40, 'checkpoint_every_steps': 10, 'schedule.warmup_steps': 5}

  def command(overrides):
    fields = {**base, **overrides}
    return lambda workdir: [sys.executable, '-m', 'train', '--config=configs/mistral_tiny.py', f'--workdir={workdir}',
                            *(f'--config.{k}={v}' for k, v in fields.items())]
  return command


def _one_device_env():
  return dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu')


def _wait_for_checkpoint(proc, workdir, step, timeout_s=240):
  """Returns once checkpoint `step` of the running `proc` is complete; fails if the run ends first."""
  deadline = time.time() + timeout_s
  while not (workdir / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists():
    assert proc.poll() is None and time.time() < deadline, f'the run ended before checkpoint {step} was complete'
    time.sleep(0.05)


@pytest.fixture(scope='session')
def one_device_env():
  """fn() -> the environment of a `python -m train` subprocess on one CPU device."""
  return _one_device_env


@pytest.fixture(scope='session')
def wait_for_checkpoint():
  """fn(proc, workdir, step): returns once checkpoint `step` of the running `proc` is complete (kill -9 tests)."""
  return _wait_for_checkpoint


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='session')
def kill_9_and_resume():
  """fn(command, tmp_path, kill_at, last_step, devices=1) -> (straight, killed, the straight run's stdout):
  `command(workdir)` (a `python -m train` command line) run twice at once on `devices` CPU devices, into tmp_path/'straight' untouched and
  tmp_path/'killed' killed with kill -9 once its checkpoint `kill_at` is complete, then rerun to the end."""
  def run(command, tmp_path, kill_at, last_step, devices=1):
    env = dict(_one_device_env(), JAX_NUM_CPU_DEVICES=str(devices))
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    reference = subprocess.Popen(command(straight), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(victim, killed, kill_at)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / 'checkpoints' / str(last_step)).exists(), 'the run finished before the kill; lengthen it'
    resumed = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout
    out, errors = reference.communicate(timeout=300)
    assert reference.returncode == 0, errors[-2000:]
    return straight, killed, out
  return run
