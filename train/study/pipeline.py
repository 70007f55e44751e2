r"""Runs a pipeline config: named stages in order, each a training run or a tool's command, each skipped when done.

  python -m train.pipeline --config=configs/zephyr_cpu.py --workdir=workdirs/zephyr_cpu
  python -m train.pipeline --config=configs/zephyr_cpu.py --workdir=workdirs/zephyr_cpu --dry_run   # the commands
  python -m train.pipeline --config=configs/zephyr_cpu.py --workdir=workdirs/zephyr_cpu --until=pairs  # up to a stage

A pipeline config is an ordinary config file (its `get_config(arg)` builds one training run) that adds
`get_pipeline(arg) -> [stage, ...]`, dicts with a `name` (its output's name in --workdir) and a `kind`:

  train      `python -m train --config=CONFIG --workdir=WORKDIR/NAME --config.KEY=VALUE` for each item of `set`;
             done when the run logged its final eval and committed its final checkpoint (train.sweep's rule).
  generate   `python -m train.generate --KEY=VALUE ... --out=WORKDIR/NAME.jsonl` for each item of `args`.
  judge      `python -m train.judge --KEY=VALUE ... --out=WORKDIR/NAME.jsonl` (scores in NAME.scores.jsonl).
  reference_logps  `python -m train.reference_logps --config=CONFIG --config.KEY=VALUE ... --out=WORKDIR/NAME.npz`.
  prompts    in process: prompts (or whole first turns, answers=True) of an embedded chat set's split -> NAME.jsonl.
  report     in process: train/study/preference_report.py's report.md and report.png of the stage's fields.

In any value, '{other}' is stage `other`'s output: its workdir or file. Each command runs in its own process (a
stage's memory goes when it ends; the pipeline itself never starts JAX), is killed with the pipeline (a kill -9 of
it leaves no stage running), and marks its stage done in WORKDIR/stages/NAME.done only when it exits 0; every
attempt's start and, when it ends, its wall time and exit status are appended to WORKDIR/stages.jsonl. A rerun skips the stages done and restarts the first
that is not: a training run from its last checkpoint, a generation after its last prompt written (both resume on
their own). A failing stage ends the pipeline with one `error:` line naming it and the stage's own exit status
(train/cli.py lists them; 75 for a preempted run, rerun to continue).
"""
import ctypes
import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import flags
from etils import epath

from train import cli
from train.study import sweep

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = {'generate': 'train.generate', 'judge': 'train.judge', 'reference_logps': 'train.reference_logps'}
KINDS = ('train', 'prompts', 'report', *COMMANDS)


def define_flags() -> None:
  """The command line flags (defined only when run as a command)."""
  flags.DEFINE_string('config', None, 'Pipeline config file, optionally FILE.py:ARG (passed to get_pipeline).')
  flags.DEFINE_string('workdir', None, 'Directory of every stage\'s output.')
  flags.DEFINE_bool('dry_run', False, 'Print each stage\'s command and whether it is done; run nothing.')
  flags.DEFINE_string('until', None, 'Stop after this stage (e.g. --until=pairs to read the pairs before DPO); '
                      'the same command without it carries on from there.')
  flags.mark_flags_as_required(['config', 'workdir'])


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  kind: str
  fields: dict


def plan(config_spec: str) -> list[Stage]:
  """The stages of `FILE.py[:ARG]`, checked: known kinds, unique names, references to earlier stages only."""
  path, _, arg = config_spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config={path}: no such file (run from the repository root).')
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_pipeline'):
    raise ValueError(f'{path} has no get_pipeline(arg); a pipeline config lists its stages there '
                     '(configs/zephyr_cpu.py is one).')
  stages, seen = [], set()
  for spec in module.get_pipeline(arg or None):
    spec = dict(spec)
    name, kind = spec.pop('name', None), spec.pop('kind', None)
    if kind not in KINDS:
      raise ValueError(f'{path}: stage {name!r} has kind {kind!r}; choose one of {list(KINDS)}.')
    if not name or name in seen or '/' in name:
      raise ValueError(f'{path}: stage name {name!r} is empty, repeated or has a "/"; each needs its own name.')
    for ref in _references(spec):
      if ref not in seen:
        raise ValueError(f'{path}: stage {name!r} uses {{{ref}}}, which is no earlier stage; order the stages so '
                         'that each follows the ones it reads.')
    seen.add(name)
    stages.append(Stage(name, kind, spec))
  return stages


def _references(value) -> set[str]:
  import string
  if isinstance(value, dict):
    return set().union(*map(_references, value.values())) if value else set()
  if isinstance(value, (list, tuple)):
    return set().union(*map(_references, value)) if value else set()
  if isinstance(value, str):
    return {field for _, field, _, _ in string.Formatter().parse(value) if field}
  return set()


def output(stage: Stage, workdir: str) -> str:
  suffix = {'train': '', 'report': '', 'reference_logps': '.npz'}.get(stage.kind, '.jsonl')
  return os.path.join(workdir, stage.name + suffix)


def resolve(value, outputs: dict[str, str]):
  """`value` with every '{name}' replaced by that stage's output, through dicts and lists."""
  if isinstance(value, dict):
    return {k: resolve(v, outputs) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [resolve(v, outputs) for v in value]
  return value.format(**outputs) if isinstance(value, str) else value


def _config_path(spec: str) -> str:
  """A config spec with its file made absolute, so that a stage's process may run from the repository root."""
  path, sep, arg = spec.partition(':')
  return os.path.abspath(path) + sep + arg


def command(stage: Stage, workdir: str, outputs: dict[str, str]) -> list[str] | None:
  """The stage's command line, or None for a stage run in process."""
  fields = resolve(stage.fields, outputs)
  out = output(stage, workdir)
  overrides = [f'--config.{k}={v}' for k, v in fields.get('set', {}).items()]
  if stage.kind == 'train':
    return [sys.executable, '-m', 'train', f'--config={_config_path(fields["config"])}', f'--workdir={out}',
            *overrides]
  if stage.kind == 'reference_logps':
    return [sys.executable, '-m', COMMANDS[stage.kind], f'--config={_config_path(fields["config"])}',
            f'--out={out}', *overrides]
  if stage.kind in COMMANDS:
    return [sys.executable, '-m', COMMANDS[stage.kind], *(f'--{k}={v}' for k, v in fields['args'].items()),
            f'--out={out}']
  return None


def _marker(workdir: str, stage: Stage) -> epath.Path:
  return epath.Path(workdir, 'stages', stage.name + '.done')


def is_done(stage: Stage, workdir: str) -> bool:
  if stage.kind == 'train':
    return sweep.finished(output(stage, workdir))
  return _marker(workdir, stage).exists()


def _die_with_parent() -> None:
  """In the child, before exec: the kernel kills it when the pipeline dies (even by SIGKILL), so a killed pipeline
  leaves no stage running that would hold the stage's workdir when it is rerun."""
  PR_SET_PDEATHSIG = 1  # noqa: N806 - linux/prctl.h
  try:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # Not Linux: a killed pipeline may leave its current stage to finish.
    pass
  os.setpgrp()  # Ctrl-C reaches the pipeline, which stops the stage itself (below).


def _run_command(args: list[str]) -> int:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  child = subprocess.Popen(args, cwd=ROOT, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
  try:
    return child.wait()
  except KeyboardInterrupt:  # Let a training stage save as it does on Ctrl-C, then stop.
    child.send_signal(signal.SIGINT)
    child.wait()
    raise


def _log(workdir: str, record: dict) -> None:
  with open(os.path.join(workdir, 'stages.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')


def run_stage(stage: Stage, workdir: str, outputs: dict[str, str]) -> None:
  """Runs one stage (not done yet) and marks it done; sweep.RunFailed on a failing command."""
  start = time.time()
  args = command(stage, workdir, outputs)
  fields = resolve(stage.fields, outputs)
  print(f'[pipeline] {stage.name}: ' + (shlex.join(args[1:]) if args else f'{stage.kind} (in process)'), flush=True)
  _log(workdir, {'stage': stage.name, 'kind': stage.kind, 'started': round(start, 2)})  # An attempt a kill may end.
  if args is None:
    if stage.kind == 'prompts':
      from train.study import prompts
      prompts.write(output(stage, workdir), **fields)
    else:
      from train.study import preference_report
      preference_report.write(workdir, **fields)
    code = 0
  else:
    code = _run_command(args)
  seconds = time.time() - start
  _log(workdir, {'stage': stage.name, 'kind': stage.kind, 'seconds': round(seconds, 2), 'exit': code})
  if code:
    raise sweep.RunFailed(f'stage {stage.name} ({stage.kind}) failed with exit status {code}; its output is above. '
                          'Fix the cause and rerun the same command: the stages done are skipped.', code)
  if stage.kind != 'train':
    _marker(workdir, stage).parent.mkdir(parents=True, exist_ok=True)
    _marker(workdir, stage).write_text(json.dumps({'command': args, 'seconds': seconds}))


def run(config_spec: str, workdir: str, dry_run: bool = False, until: str | None = None) -> None:
  stages = plan(config_spec)
  if until is not None:
    names = [s.name for s in stages]
    if until not in names:
      raise ValueError(f'--until={until}: no such stage; the stages are {", ".join(names)}.')
    stages = stages[:names.index(until) + 1]
  workdir = os.path.abspath(workdir)
  outputs = {s.name: output(s, workdir) for s in stages}
  if dry_run:
    for s in stages:
      args = command(s, workdir, outputs)
      state = 'done' if is_done(s, workdir) else 'to do'
      print(f'{s.name:16s} {state:6s} ' + (shlex.join(args[1:]) if args else f'({s.kind}, in process)'))
    return
  os.makedirs(workdir, exist_ok=True)
  started = time.time()
  for s in stages:
    if is_done(s, workdir):
      print(f'[pipeline] {s.name}: done, skipped', flush=True)
      continue
    run_stage(s, workdir, outputs)
  print(f'[pipeline] {"all " if until is None else ""}{len(stages)} stages done in {time.time() - started:.0f} s this time; '
        f'report: {os.path.join(workdir, "report.md")}', flush=True)


def main(argv):
  cli.no_arguments(argv)
  with cli.failing_on(ValueError, FileNotFoundError):
    names = [s.name for s in plan(FLAGS.config)]
    if FLAGS.until is not None and FLAGS.until not in names:
      raise ValueError(f'--until={FLAGS.until}: no such stage; the stages are {", ".join(names)}.')
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.dry_run, FLAGS.until)
  except sweep.RunFailed as e:
    cli.fail(str(e), e.code)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
