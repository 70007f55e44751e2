"""The TPU pod launcher without a cloud: accelerator table, mesh checks, exact dry-run commands, quoting, restarts."""
import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile

import pytest

from train import cli
from train.tools import launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TRICKY = '--config.data.files=/data/my corpus/*.txt'  # A field of configs/mistral_tiny.py.
SPACED = '--config.data.data_dir=/mnt/my disk/tfds'
LOOP = launch.restart_loop()
CHECK_NFNET = ('ok: configs/nfnet_i1k.py on v4-32: 16 devices (4 hosts), mesh data=16 fsdp=1 tensor=1, '
               'global batch 4096 = 256 per device')


def dry_run(capsys, *argv):
  """(other output lines, the printed commands as argv lists) of a --dry_run."""
  assert launch.main([*argv, '--dry_run']) == 0
  lines = capsys.readouterr().out.splitlines()
  commands = [shlex.split(l[2:]) for l in lines if l.startswith('$ ')]
  # So comparing argv lists compares the exact printed lines.
  assert ['$ ' + shlex.join(c) for c in commands] == [l for l in lines if l.startswith('$ ')]
  return [l for l in lines if not l.startswith('$ ')], commands


def failure(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as e:
    launch.main([*argv, '--dry_run'])
  err = capsys.readouterr()
  assert e.value.code == 2 and '$ ' not in err.out
  lines = err.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err.err
  return lines[0]


@pytest.mark.parametrize('name, chips, cores, devices, hosts', [
    ('v4-8', 4, 8, 4, 1), ('v4-32', 16, 32, 16, 4), ('v4-128', 64, 128, 64, 16), ('v5p-128', 64, 128, 64, 16),
    ('v5litepod-8', 8, 8, 8, 1), ('v5litepod-16', 16, 16, 16, 4), ('v6e-64', 64, 64, 64, 16),
    ('v6e-256', 256, 256, 256, 64), ('v3-32', 16, 32, 32, 4), ('v2-8', 4, 8, 8, 1)])
def test_accelerator_table(name, chips, cores, devices, hosts):
  accel = launch.parse_accelerator(name)
  assert (accel.name, accel.chips, accel.cores, accel.devices, accel.hosts) == (name, chips, cores, devices, hosts)
  assert launch.parse_accelerator('v5e-16').name == 'v5litepod-16'
  assert [launch.parse_accelerator(n).runtime for n in ('v4-8', 'v5litepod-4', 'v5p-8', 'v6e-8')] == [
      'tpu-ubuntu2204-base', 'v2-alpha-tpuv5-lite', 'v2-alpha-tpuv5', 'v2-alpha-tpuv6e']


@pytest.mark.parametrize('name, message', [('v4-30', 'multiple of 8'), ('v5litepod-12', 'counts chips'),
                                           ('v7-8', 'not a TPU type'), ('tpu-v4', 'not a TPU type')])
def test_bad_accelerator_names(name, message):
  with pytest.raises(ValueError, match=message):
    launch.parse_accelerator(name)


def test_bad_accelerator_on_the_command_line():
  result = subprocess.run([sys.executable, '-m', 'train.launch', 'check', '--accelerator=v4-30',
                           '--config=configs/vit_i1k.py'], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.strip() == ('error: --accelerator=v4-30: v4-N counts TensorCores (2 per chip, 4 chips per '
                                   'host), so N is a multiple of 8, e.g. v4-8, v4-32.')


@pytest.mark.parametrize('argv, line', [
    (['--accelerator=v4-32', '--config=configs/nfnet_i1k.py'], CHECK_NFNET),
    (['--accelerator=v4-32', '--config=configs/vit_i1k.py'],
     'ok: configs/vit_i1k.py on v4-32: 16 devices (4 hosts), mesh data=1 fsdp=16 tensor=1, global batch 4096 = 256 '
     'per device'),
    (['--accelerator=v5p-128', '--config=configs/nfnet_i1k.py:variant=F3', '--config.mesh.data=16',
      '--config.mesh.fsdp=-1'],
     'ok: configs/nfnet_i1k.py:variant=F3 on v5p-128: 64 devices (16 hosts), mesh data=16 fsdp=4 tensor=1, '
     'global batch 4096 = 64 per device')])
def test_check_fits(capsys, argv, line):
  assert dry_run(capsys, 'check', *argv) == ([line], [])


@pytest.mark.parametrize('argv, message', [
    (['--config.mesh.fsdp=64'], 'error: configs/nfnet_i1k.py on v4-32: 16 devices (4 hosts): mesh '),
    (['--config.batch_size=1000'], 'batch_size=1000 is not divisible by the data-parallel size data*fsdp=16'),
    (['--config.mesh.fsdpp=2'], 'error: --config.mesh.fsdpp: no such field in configs/nfnet_i1k.py')])
def test_check_rejects_what_does_not_fit(capsys, argv, message):
  line = failure(capsys, 'run', '--tpu=nf0', '--zone=us-central2-b', '--accelerator=v4-32',
                 '--config=configs/nfnet_i1k.py', '--workdir=gs://b/nf0', *argv)
  assert message in line


def test_check_error_names_the_fix(capsys):
  line = failure(capsys, 'check', '--accelerator=v4-32', '--config=configs/nfnet_i1k.py', '--config.mesh.fsdp=64')
  assert 'do not divide the 16 devices' in line and '--config.mesh.*' in line


def ssh(tpu, zone, worker, remote):
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}', f'--worker={worker}',
          f'--command={remote}']


@pytest.mark.parametrize('accelerator, tpu, zone, runtime', [('v4-32', 'nf0', 'us-central2-b', 'tpu-ubuntu2204-base'),
                                                             ('v5p-128', 'big', 'us-east5-a', 'v2-alpha-tpuv5')])
def test_create_run_delete_commands(capsys, accelerator, tpu, zone, runtime):
  common = [f'--tpu={tpu}', f'--zone={zone}', f'--accelerator={accelerator}']
  config = ['--config=configs/nfnet_i1k.py', f'--workdir=gs://bucket/{tpu}', SPACED]
  out, commands = dry_run(capsys, 'create', *common, *config)
  assert out[0].startswith(f'ok: configs/nfnet_i1k.py on {accelerator}: ')
  assert commands == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', tpu, f'--zone={zone}',
                       f'--accelerator-type={accelerator}', f'--version={runtime}']]

  out, commands = dry_run(capsys, 'run', *common, *config)
  train = ['python', '-m', 'train', '--config=configs/nfnet_i1k.py', f'--workdir=gs://bucket/{tpu}', SPACED]
  tmux = ['tmux', 'new-session', '-d', '-s', f'train-{tpu}', 'bash', '-c', LOOP, f'train-{tpu}',
          f'train-{tpu}.log', '20', *train]
  assert commands == [ssh(tpu, zone, 'all', shlex.join(tmux))]
  assert 'sleep 30' in LOOP

  assert dry_run(capsys, 'delete', f'--tpu={tpu}', f'--zone={zone}', '--project=my-proj') == ([], [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', tpu, f'--zone={zone}', '--project=my-proj', '--quiet']])


def test_printed_lines(capsys):
  launch.main(['create', '--tpu=nf0', '--zone=us-central2-b', '--accelerator=v4-32', '--dry_run'])
  assert capsys.readouterr().out == ('$ gcloud compute tpus tpu-vm create nf0 --zone=us-central2-b '
                                     '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base\n')
  launch.main(['run', '--tpu=nf0', '--zone=us-central2-b', '--command=python -m train.sweep --name="a b"',
               '--dry_run'])
  assert capsys.readouterr().out.startswith(
      "$ gcloud compute tpus tpu-vm ssh nf0 --zone=us-central2-b --worker=all '--command=tmux new-session -d -s "
      "train-nf0 bash -c '\"'\"'log=")


def test_override_round_trips_through_both_shells(capsys, tmp_path):
  """Local shell, then the remote one: the override arrives as one argv token, byte for byte."""
  nasty = '--config.data.name=a \'b\' "c" $HOME `id`; echo *'
  launch.main(['run', '--tpu=nf0', '--zone=us-central2-b', '--accelerator=v4-32', '--config=configs/mistral_tiny.py',
               '--workdir=gs://b/w', TRICKY, nasty, '--dry_run'])
  printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith('$ ')]
  local = shlex.split(printed[-1][2:])
  remote = shlex.split(local[-1].removeprefix('--command='))
  assert remote[remote.index('train-nf0.log') + 2:][-2:] == [TRICKY, nasty]

  # Execute that remote command for real: tmux and python replaced by stubs that record their argv.
  home, bin_dir = tmp_path / 'home', tmp_path / 'bin'
  for d in (home / launch.CODE_DIR, home / launch.VENV_DIR / 'bin', bin_dir):
    d.mkdir(parents=True)
  (home / launch.VENV_DIR / 'bin' / 'activate').write_text('')
  stubs = {'tmux': '#!/bin/sh\nshift 4\nexec "$@"\n',  # new-session -d -s NAME, then the command.
           'python': f'#!{sys.executable}\nimport json, os, sys\n'
                     'json.dump([os.getcwd()] + sys.argv[1:], open(os.environ["HOME"] + "/argv.json", "w"))\n'}
  for name, text in stubs.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)
  env = dict(os.environ, HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}')
  subprocess.run(['bash', '-c', local[-1].removeprefix('--command=')], env=env, cwd=home, check=True, timeout=30)
  cwd, *argv = json.loads((home / 'argv.json').read_text())
  assert cwd == str(home / launch.CODE_DIR)
  assert argv == ['-m', 'train', '--config=configs/mistral_tiny.py', '--workdir=gs://b/w', TRICKY, nasty]
  assert '[launch] exit 0: done' in (home / 'train-nf0.log').read_text()


@pytest.mark.parametrize('exits, attempts, code', [([0], 1, 0), ([1, 137, 0], 3, 0), ([2], 1, 2), ([3], 1, 3),
                                                   ([1, 1, 1, 1], 3, 1), ([75, 0], 2, 0), ([75, 1, 0], 3, 0),
                                                   ([75, 75, 75, 0], 3, 75)])
def test_restart_loop(tmp_path, exits, attempts, code):
  """Reruns until exit 0: after a preemption (75) or a crash; a bad config (2) or a non-finite loss (3) is not
  retried; at most N tries in all."""
  (tmp_path / launch.CODE_DIR).mkdir()
  (tmp_path / launch.VENV_DIR / 'bin').mkdir(parents=True)
  (tmp_path / launch.VENV_DIR / 'bin' / 'activate').write_text('')
  command = ['bash', '-c', 'n=$(wc -l < "$HOME/runs" 2>/dev/null || echo 0); echo run >> "$HOME/runs"; '
             'codes=($@); exit ${codes[$n]}', 'job', *map(str, exits)]
  result = subprocess.run(['bash', '-c', launch.restart_loop(delay_s=0), 'loop', 'job.log', '3', *command],
                          env=dict(os.environ, HOME=str(tmp_path)), capture_output=True, text=True, timeout=30)
  assert result.returncode == code
  assert (tmp_path / 'runs').read_text().count('run') == attempts
  log = (tmp_path / 'job.log').read_text()
  assert log.count('[launch] attempt') == attempts
  assert log.count('[launch] exit 75: preempted, checkpoint saved') == exits[:attempts].count(cli.PREEMPTED_EXIT)


def test_spot_and_queued_create(capsys):
  common = ['--tpu=nf0', '--zone=us-central2-b', '--accelerator=v5litepod-16', '--project=p']
  create = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'nf0', '--zone=us-central2-b', '--project=p',
            '--node-id=nf0', '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite']
  wait = ['bash', '-c', launch.WAIT_ACTIVE, 'wait', 'gcloud', 'compute', 'tpus', 'queued-resources', 'describe',
          'nf0', '--zone=us-central2-b', '--project=p', '--format=value(state.state)']
  assert dry_run(capsys, 'create', *common, '--spot')[1] == [create + ['--spot'], wait]
  assert dry_run(capsys, 'create', *common, '--queued', '--runtime_version=v2-alpha-tpuv5-lite-x')[1] == [
      create[:-1] + ['--runtime-version=v2-alpha-tpuv5-lite-x'], wait]
  assert dry_run(capsys, 'delete', '--tpu=nf0', '--zone=us-central2-b', '--spot')[1] == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'nf0', '--zone=us-central2-b', '--force', '--quiet']]


def test_setup_ships_the_checkout_or_clones_a_commit(capsys):
  _, commands = dry_run(capsys, 'setup', '--tpu=nf0', '--zone=z')
  tarball = os.path.join(tempfile.gettempdir(), 'nf0-convnets-at-scale.tar.gz')
  assert commands[:2] == [
      ['git', '-C', REPO, 'archive', '--format=tar.gz', f'--output={tarball}', 'HEAD'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'nf0:convnets-at-scale.tar.gz', '--zone=z',
       '--worker=all']]
  remote = commands[2][-1].removeprefix('--command=').split(' && ')
  assert commands[2][:-1] == ssh('nf0', 'z', 'all', '')[:-1]
  assert remote[:3] == ['rm -rf convnets-at-scale', 'mkdir convnets-at-scale',
                        'tar -xzf convnets-at-scale.tar.gz -C convnets-at-scale']
  assert remote[-1] == "../convnets-at-scale-venv/bin/pip install -q -e '.[tpu]'"

  _, commands = dry_run(capsys, 'setup', '--tpu=nf0', '--zone=z', '--repo=https://example.com/r.git', '--ref=abc123')
  remote = commands[0][-1].removeprefix('--command=').split(' && ')
  assert len(commands) == 1 and remote[:3] == [
      'rm -rf convnets-at-scale', 'git clone -q https://example.com/r.git convnets-at-scale',
      'git -C convnets-at-scale checkout -q abc123']


def test_up_logs_stop_and_a_sweep_command(capsys):
  out, commands = dry_run(capsys, 'up', '--tpu=nf0', '--zone=z', '--accelerator=v4-32',
                          '--config=configs/nfnet_i1k.py', '--workdir=gs://b/nf0')
  steps = [c[3] if c[0] == 'git' else c[4] for c in commands]
  assert out == [CHECK_NFNET] and steps == ['create', 'archive', 'scp', 'ssh', 'ssh']
  logs = dry_run(capsys, 'logs', '--tpu=nf0', '--zone=z', '--worker=3')[1]
  assert logs == [ssh('nf0', 'z', '3', 'tail -n 200 -F train-nf0.log')]
  stop = dry_run(capsys, 'stop', '--tpu=nf0', '--zone=z')[1]
  assert stop == [ssh('nf0', 'z', 'all', 'tmux kill-session -t train-nf0')]
  sweep = 'python -m train.sweep --grid="lr=1e-3, 3e-3" --workdir=gs://b/sweep'
  _, commands = dry_run(capsys, 'run', '--tpu=nf0', '--zone=z', f'--command={sweep}')
  remote = shlex.split(commands[0][-1].removeprefix('--command='))
  assert remote[remote.index('train-nf0.log') + 2:] == shlex.split(sweep)


@pytest.mark.parametrize('argv, message', [
    (['create', '--zone=z', '--accelerator=v4-32'], 'create needs --tpu'),
    (['run', '--tpu=nf0', '--zone=z', '--config=configs/nfnet_i1k.py', '--workdir=gs://b/w'],
     'run needs --accelerator'),
    (['setup', '--tpu=nf0', '--zone=z', '--repo=https://example.com/r.git'], '--repo and --ref go together'),
    (['create', '--tpu=NF_0', '--zone=z', '--accelerator=v4-32'], 'lowercase letters, digits and hyphens'),
    (['run', '--tpu=nf0', '--zone=z', '--command=python -m train.sweep', '--config=configs/nfnet_i1k.py'],
     'either --command or --config'),
    (['create', '--tpu=nf0', '--zone=z', '--accelerator=v4-32', '--spot', '--queued'], 'not allowed with'),
    (['run', '--tpu=nf0', '--zone=z', '--accelerator=v4-32', '--config=configs/nfnet_i1k.py', '--workdir=gs://b/w',
      '--config.total_steps', '10'], 'write overrides as one token'),
    (['deploy', '--tpu=nf0'], "invalid choice: 'deploy'")])
def test_bad_input_is_one_line(capsys, argv, message):
  assert message in failure(capsys, *argv)
