r"""Runs training on a Cloud TPU VM slice: create it, set it up, run on every host, follow the log, delete it.

  python -m train.launch ACTION --tpu=NAME --zone=ZONE --accelerator=v4-32 [--project=P] \
      [--spot | --queued] [--runtime_version=V] [--repo=GIT_URL --ref=COMMIT] \
      --config=configs/FILE.py[:ARGS] --workdir=gs://BUCKET/DIR [--config.key=value ...] [--dry_run]

ACTION is one of:
  check   loads the config and checks its mesh and batch against the slice's devices and hosts (no cloud);
          also done before create, run and up whenever --config is given.
  create  the TPU VM (`tpu-vm create`), or a queued resource with --queued / --spot, waited for until ACTIVE.
  setup   ships the code (a `git archive HEAD` tarball, or `git clone --repo` at `--ref`) to every host and
          installs it with `pip install -e '.[tpu]'` in a Python 3.11 virtualenv.
  run     starts `python -m train --config=... --workdir=... [overrides]` on every host inside a tmux session
          named train-NAME, under a loop that reruns it (resuming from the last checkpoint) until it exits 0,
          i.e. has reached total_steps: a preempted run exits 75 (train.PREEMPTED_EXIT) and is rerun, as is a
          transient I/O failure (74, e.g. a full disk during a save) or a crash (1); exit 2 (bad input) and 3
          (non-finite loss) are not retried (train/cli.py lists the statuses). --command='python -m train.sweep
          ...' runs another command the same way instead of --config/--workdir.
  logs    follows the log of worker 0 (--worker=N for another host).
  stop    ends the tmux session on every host.
  delete  the TPU VM (or the queued resource and its TPU).
  up      create + setup + run.

Every step is a command built as a list of argv tokens; --dry_run prints each one (`$ ` + shlex.join) and runs
nothing. Bad input stops with one `error:` line and exit status 2; a failed step with exit status 1.
"""
import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile

from train import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repository.
CODE_DIR = 'convnets-at-scale'  # On each host, under $HOME.
VENV_DIR = 'convnets-at-scale-venv'  # Outside the code, so that shipping new code keeps the installed packages.
TARBALL = 'convnets-at-scale.tar.gz'
RESTART_DELAY_S = 30
POLL_S = 30  # Between looks at a queued resource's state.
ACTIONS = ('check', 'create', 'setup', 'run', 'logs', 'stop', 'delete', 'up')


@dataclasses.dataclass(frozen=True)
class Generation:
  counts: str  # What N in 'vX-N' counts: 'cores' (TensorCores) or 'chips'.
  devices_per_chip: int  # JAX devices: v4 and v5p chips join their two TensorCores as one (megacore).
  chips_per_host: int  # In a multi-host slice.
  one_host_chips: int  # The largest slice on a single VM.
  runtime: str  # The TPU software version for JAX.


GENERATIONS = {
    'v2': Generation('cores', 2, 4, 4, 'tpu-ubuntu2204-base'),
    'v3': Generation('cores', 2, 4, 4, 'tpu-ubuntu2204-base'),
    'v4': Generation('cores', 1, 4, 4, 'tpu-ubuntu2204-base'),
    'v5p': Generation('cores', 1, 4, 4, 'v2-alpha-tpuv5'),
    'v5litepod': Generation('chips', 1, 4, 8, 'v2-alpha-tpuv5-lite'),
    'v6e': Generation('chips', 1, 4, 8, 'v2-alpha-tpuv6e'),
}
CHIP_SLICES = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e and v6e: up to a 16x16 pod.
EXAMPLES = 'e.g. v4-32, v5p-128, v5litepod-16, v6e-64'


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # As gcloud's --accelerator-type spells it.
  chips: int
  cores: int
  devices: int
  hosts: int
  runtime: str


def parse_accelerator(name: str) -> Slice:
  """'v4-32' -> Slice(chips=16, cores=32, devices=16, hosts=4, ...)."""
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', name.strip().lower())
  generation = {'v5e': 'v5litepod'}.get(m[1], m[1]) if m else None
  if generation not in GENERATIONS:
    raise ValueError(f'--accelerator={name!r} is not a TPU type; use GENERATION-SIZE with GENERATION one of '
                     f'{", ".join(GENERATIONS)} ({EXAMPLES}).')
  gen, n = GENERATIONS[generation], int(m[2])
  if gen.counts == 'cores':
    if n < 8 or n % 8:
      raise ValueError(f'--accelerator={name}: {generation}-N counts TensorCores (2 per chip, 4 chips per host), '
                       f'so N is a multiple of 8, e.g. {generation}-8, {generation}-32.')
    chips, cores = n // 2, n
  else:
    if n not in CHIP_SLICES:
      raise ValueError(f'--accelerator={name}: {generation}-N counts chips and N is one of {CHIP_SLICES}.')
    chips, cores = n, n
  hosts = 1 if chips <= gen.one_host_chips else chips // gen.chips_per_host
  return Slice(f'{generation}-{n}', chips, cores, chips * gen.devices_per_chip, hosts, gen.runtime)


def check(spec: str, overrides, accel: Slice) -> str:
  """One 'ok: ...' line if the config's mesh and batch fit the slice; ValueError with the reason if not."""
  config = cli.load_config(spec, overrides)
  from train import loop, sharding  # Import jax: only when a config is checked.
  where = f'{spec} on {accel.name}: {accel.devices} devices ({_plural(accel.hosts, "host")})'
  try:
    data, fsdp, sequence, tensor = loop.check_config(config, num_devices=accel.devices, process_count=accel.hosts)
  except ValueError as e:
    raise ValueError(f'{where}: {" ".join(str(e).split())}') from None
  rows = config.batch_size // (data * fsdp)
  share = f'{rows} per device' if tensor == 1 else f'{rows} per group of {tensor} tensor-parallel devices'
  axes = sharding.mesh_text({'data': data, 'fsdp': fsdp, 'sequence': sequence, 'tensor': tensor})
  return f'ok: {where}, mesh {axes}, global batch {config.batch_size} = {share}'


def _plural(n: int, word: str) -> str:
  return f'{n} {word}' if n == 1 else f'{n} {word}s'


def restart_loop(delay_s: int = RESTART_DELAY_S) -> str:
  """The bash -c script run on each host: $1 the log (under $HOME), $2 the most attempts, the rest the command.

  The command arrives as "$@", so it is never re-parsed by a shell: every token reaches it exactly. It is rerun
  until it exits 0 (done), 2 (bad input) or 3 (non-finite loss), at most $2 times in all; PREEMPTED_EXIT (a
  preemption notice, checkpoint saved), TRANSIENT_IO_EXIT (74: a full disk, a network filesystem error) and an
  unexpected crash (1) are rerun.
  """
  return (
      'log="$HOME/$1" tries=$2; shift 2; say() { echo "[launch] $*" | tee -a "$log"; }; '
      f'cd "$HOME/{CODE_DIR}" && . "$HOME/{VENV_DIR}/bin/activate" '
      f'|| {{ say "no code or virtualenv under $HOME: run the setup action first"; exit 1; }}; '
      'for ((n = 1; ; n++)); do say "attempt $n on $(hostname): $*"; '
      '"$@" 2>&1 | tee -a "$log"; code=${PIPESTATUS[0]}; '
      'case $code in 0) say "exit 0: done"; exit 0;; '
      # A bad config fails again at once, and a resumed non-finite loss repeats exactly: neither is retried.
      f'{cli.BAD_INPUT_EXIT}|{cli.NON_FINITE_EXIT}) say "exit $code: not retried; fix the cause and run again"; '
      'exit $code;; '
      f'{cli.PREEMPTED_EXIT}) say "exit $code: preempted, checkpoint saved";; esac; '
      'if ((n >= tries)); then say "exit $code: giving up after $n attempts"; exit $code; fi; '
      f'say "exit $code: rerunning in {delay_s} s (resumes from the last checkpoint)"; sleep {delay_s}; done')


# Polls a queued resource ("$@" is the describe command) until its TPU exists.
WAIT_ACTIVE = ('while state=$("$@"); do case $state in ACTIVE) exit 0;; FAILED|SUSPEND*) '
               'echo "error: the queued resource is $state; delete it and create it again" >&2; exit 1;; esac; '
               f'echo "waiting for the TPU ($state)"; sleep {POLL_S}; done; exit 1')


def session(args) -> str:
  return f'train-{args.tpu}'


def log_file(args) -> str:
  return f'train-{args.tpu}.log'  # Under $HOME on each host.


def train_command(args) -> list[str]:
  if args.command:
    return shlex.split(args.command)
  return ['python', '-m', 'train', f'--config={args.config}', f'--workdir={args.workdir}', *args.overrides]


def _where(args) -> list[str]:
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def _gcloud(args, *words) -> list[str]:
  return ['gcloud', 'compute', 'tpus', *words, args.tpu, *_where(args)]


def _ssh(args, worker, *commands: list[str]) -> list[str]:
  remote = ' && '.join(shlex.join(c) for c in commands)
  return _gcloud(args, 'tpu-vm', 'ssh') + [f'--worker={worker}', f'--command={remote}']


def _queued(args) -> bool:
  return args.spot or args.queued


def _create(args) -> list[list[str]]:
  accel = parse_accelerator(args.accelerator)
  runtime = args.runtime_version or accel.runtime
  if not _queued(args):
    return [_gcloud(args, 'tpu-vm', 'create') + [f'--accelerator-type={accel.name}', f'--version={runtime}']]
  create = _gcloud(args, 'queued-resources', 'create') + [
      f'--node-id={args.tpu}', f'--accelerator-type={accel.name}', f'--runtime-version={runtime}']
  describe = _gcloud(args, 'queued-resources', 'describe') + ['--format=value(state.state)']
  return [create + (['--spot'] if args.spot else []), ['bash', '-c', WAIT_ACTIVE, 'wait', *describe]]


def _setup(args) -> list[list[str]]:
  commands, fetch = [], [['rm', '-rf', CODE_DIR]]
  if args.repo:
    fetch += [['git', 'clone', '-q', args.repo, CODE_DIR], ['git', '-C', CODE_DIR, 'checkout', '-q', args.ref]]
  else:
    local = os.path.join(tempfile.gettempdir(), f'{args.tpu}-{TARBALL}')
    commands += [['git', '-C', ROOT, 'archive', '--format=tar.gz', f'--output={local}', 'HEAD'],
                 ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', local, f'{args.tpu}:{TARBALL}', *_where(args),
                  '--worker=all']]
    fetch += [['mkdir', CODE_DIR], ['tar', '-xzf', TARBALL, '-C', CODE_DIR]]
  apt = ['sudo', 'DEBIAN_FRONTEND=noninteractive', 'apt-get', '-q', '-y', '-o', 'DPkg::Lock::Timeout=600']
  install = [
      # The TPU images run Ubuntu 22.04, whose python3 is 3.10; setup.cfg needs 3.11.
      apt + ['update'], apt + ['install', 'python3.11', 'python3.11-venv', 'tmux'],
      ['python3.11', '-m', 'venv', VENV_DIR], ['cd', CODE_DIR],
      [f'../{VENV_DIR}/bin/pip', 'install', '-q', '-e', '.[tpu]']]
  return commands + [_ssh(args, 'all', *fetch, *install)]


def _run(args) -> list[list[str]]:
  # tmux (>= 3.0) runs a command given as several arguments without a shell, so the argv arrives intact.
  tmux = ['tmux', 'new-session', '-d', '-s', session(args), 'bash', '-c', restart_loop(), session(args),
          log_file(args), str(args.max_attempts), *train_command(args)]
  return [_ssh(args, 'all', tmux)]


def plan(action: str, args) -> list[list[str]]:
  """The commands (argv lists) that carry out `action`, in order; runs nothing."""
  if action == 'up':
    return _create(args) + _setup(args) + _run(args)
  if action == 'create':
    return _create(args)
  if action == 'setup':
    return _setup(args)
  if action == 'run':
    return _run(args)
  if action == 'logs':
    return [_ssh(args, args.worker, ['tail', '-n', '200', '-F', log_file(args)])]
  if action == 'stop':
    return [_ssh(args, 'all', ['tmux', 'kill-session', '-t', session(args)])]
  if action == 'delete':
    if _queued(args):
      return [_gcloud(args, 'queued-resources', 'delete') + ['--force', '--quiet']]
    return [_gcloud(args, 'tpu-vm', 'delete') + ['--quiet']]
  if action == 'check':
    return []
  raise ValueError(f'unknown action {action!r}; use one of {", ".join(ACTIONS)}.')


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    cli.fail(f'{message} (see python -m train.launch --help)')


def parse_args(argv):
  """Namespace of the flags; --config.key=value overrides are kept verbatim, in order, in `.overrides`."""
  parser = _Parser(prog='python -m train.launch', description=__doc__.split('\n\n')[0], allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('action', choices=ACTIONS)
  parser.add_argument('--tpu', help='TPU VM name (lowercase letters, digits, hyphens).')
  parser.add_argument('--zone', help='e.g. us-central2-b')
  parser.add_argument('--accelerator', help=f'TPU type, {EXAMPLES}.')
  parser.add_argument('--project', help='Google Cloud project (default: gcloud\'s core/project).')
  parser.add_argument('--runtime_version', help='TPU software version (default: the one for JAX on the type).')
  tier = parser.add_mutually_exclusive_group()
  tier.add_argument('--spot', action='store_true', help='A Spot TPU, requested as a queued resource.')
  tier.add_argument('--queued', action='store_true', help='An on-demand TPU requested as a queued resource.')
  parser.add_argument('--repo', help='Clone this git URL on each host instead of copying the local HEAD.')
  parser.add_argument('--ref', help='The commit (or tag) of --repo to check out.')
  parser.add_argument('--config', help='configs/FILE.py[:ARGS], as for python -m train.')
  parser.add_argument('--workdir', help='gs:// directory for checkpoints and metrics (resumed if present).')
  parser.add_argument('--command', help='Run this command (e.g. python -m train.sweep ...) instead of '
                      'python -m train --config=... --workdir=...')
  parser.add_argument('--max_attempts', type=int, default=20, help='Most runs of the command by the restart loop.')
  parser.add_argument('--worker', default='0', help='The host whose log `logs` follows.')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith('--config.')]
  for o in overrides:
    if '=' not in o:
      cli.fail(f'{o}: write overrides as one token, --config.KEY=VALUE.')
  args = parser.parse_args([a for a in argv if not a.startswith('--config.')])
  args.overrides = overrides
  _validate(args)
  return args


def _validate(args):
  needs = {'check': ['accelerator', 'config'], 'create': ['tpu', 'zone', 'accelerator'],
           'up': ['tpu', 'zone', 'accelerator']}.get(args.action, ['tpu', 'zone'])
  if args.action in ('run', 'up') and not args.command:
    needs += ['accelerator', 'config', 'workdir']  # The accelerator to check the config's mesh against.
  missing = [f'--{n}' for n in dict.fromkeys(needs) if not getattr(args, n)]
  if missing:
    cli.fail(f'{args.action} needs {", ".join(missing)} (e.g. --tpu=my-tpu --zone=us-central2-b '
             '--accelerator=v4-32 --config=configs/nfnet_i1k.py --workdir=gs://BUCKET/DIR).')
  if args.tpu and not re.fullmatch(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', args.tpu):
    cli.fail(f'--tpu={args.tpu!r}: a TPU name is lowercase letters, digits and hyphens, starting with a letter.')
  if args.command and (args.config or args.workdir or args.overrides):
    cli.fail('give either --command or --config/--workdir (with --config.* overrides), not both.')
  if args.overrides and not args.config:
    cli.fail(f'{args.overrides[0]} overrides a field of --config, which is missing.')
  if bool(args.repo) != bool(args.ref):
    cli.fail('--repo and --ref go together: --repo=GIT_URL --ref=COMMIT, so that every host runs the same code.')
  if args.max_attempts < 1:
    cli.fail(f'--max_attempts={args.max_attempts} must be at least 1.')


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    accel = parse_accelerator(args.accelerator) if args.accelerator else None
    if args.config and args.action in ('check', 'create', 'run', 'up'):
      print(check(args.config, args.overrides, accel), flush=True)
      if args.action in ('run', 'up') and accel.hosts > 1 and not args.workdir.startswith('gs://'):
        print(f'warning: --workdir={args.workdir} is not a gs:// path: the {accel.hosts} hosts will not share '
              'its checkpoints.', file=sys.stderr, flush=True)
    commands = plan(args.action, args)
  except ValueError as e:
    cli.fail(e)
  if not args.dry_run and not args.repo and args.action in ('setup', 'up'):
    dirty = subprocess.run(['git', '-C', ROOT, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True).stdout
    if dirty:
      print('warning: uncommitted changes are not shipped (the code is `git archive HEAD`); commit them first.',
            file=sys.stderr, flush=True)
  for i, command in enumerate(commands):
    print('$ ' + shlex.join(command), flush=True)
    if args.dry_run:
      continue
    try:
      subprocess.run(command, check=True)
    except FileNotFoundError:
      cli.fail(f'{command[0]} is not installed or not on PATH (gcloud: '
               'https://cloud.google.com/sdk/docs/install).')
    except subprocess.CalledProcessError as e:
      cli.fail(f'step {i + 1} of {len(commands)} exited with status {e.returncode} (above); fix the cause and run '
               'the remaining steps, e.g. the next action.', code=1)
  if args.action in ('run', 'up') and not args.dry_run:
    print(f'started in tmux session {session(args)} on every host; follow it with: python -m train.launch logs '
          f'--tpu={args.tpu} --zone={args.zone}' + (f' --project={args.project}' if args.project else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
