"""The shared loop end to end on the digits data: sharding equivalence, resume, preemption, NaN, eval."""
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

from train import PREEMPTED_EXIT, loop
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_metrics(workdir):
  return [{k: v for k, v in r.items() if k.startswith(('train/', 'eval/', 'step'))}
          for r in metrics_lib.read_metrics(workdir)]


# SGD, not Adam, for the mesh comparison: the key bias has an exactly-zero gradient (softmax ignores a
# per-query constant), whose rounding noise Adam's normalisation would blow up to full-size updates.
MESH_TEST = {'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'schedule.base_learning_rate': 0.1}


@pytest.fixture(scope='module')
def one_device_run(digits_dir, tmp_path_factory, tiny_config):
  workdir = str(tmp_path_factory.mktemp('one_device'))
  out = loop.train(tiny_config(digits_dir, **{'mesh.data': 1}, **MESH_TEST), workdir, devices=jax.devices()[:1])
  return jax.device_get(out['state']['trainable']), _train_metrics(workdir)


@pytest.mark.parametrize('mesh, expected_specs', [
    ({'data': 8, 'fsdp': 1, 'tensor': 1}, {}),
    ({'data': 2, 'fsdp': 4, 'tensor': 1}, {'mlp/fc1/kernel': ('fsdp', 'tensor'),
                                           'attn/query/kernel': ('fsdp', 'tensor', None)}),
    ({'data': 2, 'fsdp': 1, 'tensor': 4}, {'mlp/fc2/kernel': ('tensor', 'fsdp'),
                                           'attn/out/kernel': (None, None, 'fsdp')}),
])
def test_meshes_match_one_device(one_device_run, digits_dir, tmp_path, mesh, expected_specs, tiny_config):
  params_1, metrics_1 = one_device_run
  config = tiny_config(digits_dir, **{f'mesh.{k}': v for k, v in mesh.items()}, **MESH_TEST)
  # heads=2 cannot split 4 ways: heads stay replicated here, and the MLP hidden dim (32) is split instead.
  if mesh['tensor'] == 4:
    config.sharding_rules.heads = ''
  out = loop.train(config, str(tmp_path))
  params = out['state']['trainable']
  flat = {'/'.join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  for suffix, spec in expected_specs.items():
    (name,) = [n for n in flat if n.endswith('block_0/' + suffix)]
    assert tuple(flat[name].sharding.spec) + (None,) * (flat[name].ndim - len(flat[name].sharding.spec)) == spec, name
    if name.endswith(('fc1/kernel', 'fc2/kernel', 'query/kernel')):
      assert flat[name].addressable_shards[0].data.size < flat[name].size  # Really split over devices.
  losses = [m['train/loss'] for m in _train_metrics(str(tmp_path))]
  np.testing.assert_allclose(losses, [m['train/loss'] for m in metrics_1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), jax.device_get(params), params_1)


def test_resume_onto_a_different_mesh_restores_into_its_shardings(digits_dir, tmp_path, tiny_config):
  config = tiny_config(digits_dir, total_steps=4, checkpoint_every_steps=2, **MESH_TEST)
  straight = jax.device_get(loop.train(config, str(tmp_path))['state']['trainable'])
  # As if the run had died after its step-2 checkpoint; it resumes on an FSDP mesh instead of data=8.
  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  config.mesh.data, config.mesh.fsdp = 2, 4
  out = loop.train(config, str(tmp_path))
  kernel = out['state']['trainable']['encoder']['block_0']['mlp']['fc1']['kernel']
  assert kernel.sharding.spec[0] == 'fsdp' and kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // 4
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path)) if 'train/loss' in r] == [1, 2, 3, 4]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), jax.device_get(out['state']['trainable']),
               straight)


def test_eval_counts_each_example_once_and_ema(digits_dir, tmp_path, tiny_config):
  # 360 test digits in batches of 48 (not a divisor): the last batch is padded and masked.
  config = tiny_config(digits_dir, eval_batch_size=48, eval_every_steps=2, total_steps=4,
                       **{'optimizer.ema_decay': 0.9, 'optimizer.ema_warmup': True})
  out = loop.train(config, str(tmp_path))
  records = [r for r in metrics_lib.read_metrics(str(tmp_path)) if 'eval/accuracy' in r]
  assert [r['step'] for r in records] == [2, 4]
  assert all(r['eval/examples'] == 360 for r in records)
  assert set(out['state']) == {'step', 'trainable', 'opt_state', 'ema'}
  assert 0.0 <= records[-1]['eval/accuracy'] <= 1.0


def test_non_finite_loss_stops_naming_step_and_keeps_good_checkpoint(digits_dir, tmp_path, tiny_config):
  config = tiny_config(digits_dir, total_steps=6, checkpoint_every_steps=1, log_every_steps=3,
                       **{'schedule.base_learning_rate': 1e30, 'schedule.warmup_steps': 0,
                          'optimizer.grad_clip_norm': None, 'optimizer.name': 'sgd', 'optimizer.momentum': 0.0})
  with pytest.raises(loop.NonFiniteLossError, match=r'is (nan|inf|-inf) at step 1; stopped without saving'):
    loop.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '1')


def _cli(workdir, *overrides, data_dir):
  return [sys.executable, '-m', 'train', '--config=configs/vit_digits.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *overrides]


# The model shrunk (what is pinned is the resume, not the model): it compiles and steps in a fraction of the time.
RESUME_FLAGS = ('--config.total_steps=120', '--config.log_every_steps=5', '--config.eval_every_steps=40',
                '--config.checkpoint_every_steps=20', '--config.model.width=16', '--config.model.depth=2',
                '--config.model.mlp_dim=32', '--config.model.num_heads=2')


def _final_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']['trainable']


# With a frozen base (the freeze adapter): never checkpointed, rebuilt from the seed on resume. Without an
# adapter, tests/benchmarks/test_soak.py kills a run at start-up, during a save and between steps.
@pytest.mark.parametrize('adapter', [('--config.adapter.name=freeze', '--config.adapter.params=encoder/block_0/.*')],
                         ids=['freeze'])
def test_kill_and_resume_equals_uninterrupted_run_bitwise(
    digits_dir, tmp_path, adapter, one_device_env, wait_for_checkpoint):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  flags = (*RESUME_FLAGS, *adapter)
  reference = subprocess.Popen(_cli(straight, *flags, data_dir=digits_dir), cwd=REPO, env=one_device_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  victim = subprocess.Popen(_cli(killed, *flags, data_dir=digits_dir), cwd=REPO, env=one_device_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_checkpoint(victim, killed, 20)  # kill -9 as soon as a checkpoint is complete, while the run goes on.
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert not (killed / 'checkpoints' / '120').exists(), 'the run finished before the kill; lengthen it'
  resumed = subprocess.run(_cli(killed, *flags, data_dir=digits_dir), cwd=REPO, env=one_device_env(),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resumed from' in resumed.stdout
  assert reference.wait(timeout=300) == 0
  assert _train_metrics(killed) == _train_metrics(straight)
  a, b = _final_params(str(killed), 120), _final_params(str(straight), 120)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert ('block_0' in a['encoder']) == (not adapter)  # The frozen block is not in the checkpoint.


def test_sigterm_saves_and_exits_for_a_restart(digits_dir, tmp_path, one_device_env):
  proc = subprocess.Popen(_cli(tmp_path, '--config.total_steps=100000', '--config.log_every_steps=1',
                               '--config.checkpoint_every_steps=100000', data_dir=digits_dir),
                          cwd=REPO, env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith('step 5/'):
      proc.send_signal(signal.SIGTERM)
      break
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT == 75  # Not 0: a restart loop reruns it.
  (line,) = [l for l in out.splitlines() if l.startswith('preempted at step')]
  step = int(line.split()[3].rstrip(':'))
  assert 5 <= step < 100000
  assert (tmp_path / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists()


@pytest.mark.parametrize('overrides, message', [
    (['--config.no_such_key=1'], 'no_such_key'),
    (['--config.data.name=no_such_dataset'], 'no_such_dataset'),
    (['--config.mesh.data=3'], 'mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available'),
    (['--config.batch_size=20'], 'batch_size=20 is not divisible by the data-parallel size data*fsdp=8'),
    (['--config.adapter.name=lora9'],
     "adapter.name='lora9' is unknown; choose one of ['freeze', 'lora', 'none', 'qlora']"),
    (['--config.task.name=regression'], "task.name='regression' is unknown; choose one of"),
    (['--config.microbatches=3'], 'microbatches=3 does not divide the per-device batch 16'),
])
def test_bad_input_fails_at_start_with_one_line(digits_dir, tmp_path, overrides, message):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu')
  proc = subprocess.run(_cli(tmp_path, *overrides, data_dir=digits_dir), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


# The tiny ViT of tests/train/conftest.py as command-line overrides, for runs that must be real commands.
TINY = ('--config.model.width=16', '--config.model.depth=2', '--config.model.mlp_dim=32',
        '--config.model.num_heads=2', '--config.model.patch_size=4', '--config.batch_size=16',
        '--config.eval_batch_size=16', '--config.eval_every_steps=0', '--config.schedule.warmup_steps=1')


def _clean(stderr):
  """What a user must never see on stderr: tracebacks, asyncio's spam, library warnings they cannot act on."""
  for bad in ('Traceback', 'Event loop is closed', 'overriding'):
    assert bad not in stderr, stderr[-3000:]


def test_resuming_with_another_model_is_one_line_and_changes_nothing(digits_dir, tmp_path, tiny_config, one_device_env):
  loop.train(tiny_config(digits_dir, total_steps=1, checkpoint_every_steps=1, **{'schedule.warmup_steps': 0}),
             str(tmp_path))
  before = {name: (tmp_path / name).read_bytes() for name in ('config.json', 'metrics.jsonl')}
  listing = sorted(os.listdir(tmp_path))
  proc = subprocess.run(_cli(tmp_path, *TINY, '--config.model.mlp_dim=64', '--config.total_steps=2',
                             data_dir=digits_dir), cwd=REPO, env=one_device_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  _clean(proc.stderr)
  (error,) = proc.stderr.strip().splitlines()
  assert error.startswith(f"error: {tmp_path} holds another model: parameter 'encoder/block_0/mlp/fc1/bias' has "
                          'shape (32,) there but (64,) in this model; resume with the config it was trained with '
                          f'({tmp_path}/config.json) or start a new --workdir.'), error
  # Nothing changed: tools reading config.json still load the model the checkpoint holds.
  assert {name: (tmp_path / name).read_bytes() for name in before} == before
  assert sorted(os.listdir(tmp_path)) == listing


def test_two_runs_started_together_one_is_refused_naming_the_other(digits_dir, tmp_path, one_device_env):
  flags = (*TINY, '--config.total_steps=30', '--config.log_every_steps=1', '--config.checkpoint_every_steps=10')
  procs = [subprocess.Popen(_cli(tmp_path, *flags, data_dir=digits_dir), cwd=REPO, env=one_device_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  results = [(p, *p.communicate(timeout=300)) for p in procs]
  (winner, _, winner_err), = [r for r in results if r[0].returncode == 0]
  (loser, _, loser_err), = [r for r in results if r[0].returncode == 2]
  _clean(winner_err)
  _clean(loser_err)
  (error,) = loser_err.strip().splitlines()
  assert error.startswith(f'error: {tmp_path} is in use by another run (pid {winner.pid} on host '
                          f'{socket.gethostname()} since '), error
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path))] == list(range(1, 31))
  assert not os.path.exists(tmp_path / 'lock')


def test_ctrl_c_saves_at_the_step_boundary_and_a_rerun_resumes(
    digits_dir, tmp_path, one_device_env, wait_for_checkpoint):
  flags = (*TINY, '--config.total_steps=200', '--config.log_every_steps=50', '--config.checkpoint_every_steps=50')
  proc = subprocess.Popen(_cli(tmp_path, *flags, data_dir=digits_dir), cwd=REPO, env=one_device_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  wait_for_checkpoint(proc, tmp_path, 50)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
  _clean(err)
  assert 'KeyboardInterrupt' not in err and 'error:' not in err
  (line,) = [l for l in out.splitlines() if l.startswith('preempted at step')]
  step = int(line.split()[3].rstrip(':'))
  assert 50 <= step < 200, 'the run finished before the interrupt; lengthen it'
  assert (tmp_path / 'checkpoints' / str(step) / '_CHECKPOINT_METADATA').exists()
  assert not os.path.exists(tmp_path / 'lock')
  resumed = subprocess.run(_cli(tmp_path, *flags, data_dir=digits_dir), cwd=REPO,
                           env=one_device_env(), capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from {tmp_path}/checkpoints at step {step}' in resumed.stdout
  assert (tmp_path / 'checkpoints' / '200' / '_CHECKPOINT_METADATA').exists()


def test_a_second_ctrl_c_stops_at_once(monkeypatch, capfd):
  def exit_now(code):  # os._exit would end pytest itself.
    raise SystemExit(code)
  monkeypatch.setattr(os, '_exit', exit_now)
  before = signal.getsignal(signal.SIGINT)
  aborted = []
  with loop._StopFlag(enabled=True, on_abort=lambda: aborted.append(True)) as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert stop.requested and not aborted  # The first one only asks for a save at the step boundary.
    with pytest.raises(SystemExit) as e:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
  assert e.value.code == 130 and aborted == [True]
  err = capfd.readouterr().err
  assert [l for l in err.splitlines() if l] == [
      'stopping at the next step boundary to save a checkpoint (Ctrl-C again: stop at once, losing the steps '
      'since the last one)',
      'error: interrupted twice: stopped without saving; rerun the same command to resume from the last checkpoint']
  assert signal.getsignal(signal.SIGINT) is before
