r"""Runs a study: expands a sweep config into named runs, trains them one after another, then analyses them.

  python -m train.sweep --config=configs/convnets_at_scale_cpu.py --workdir=workdirs/convnets_at_scale_cpu
  python -m train.sweep --config=configs/convnets_at_scale.py --workdir=gs://BUCKET/study --dry_run

A sweep config is an ordinary config file (its `get_config(arg)` builds one run, so any single run is also
`python -m train --config=FILE:ARG`) that adds `get_sweep(arg) -> [ARG, ...]`, the runs' config arguments,
and `run_name(ARG) -> str`, each run's directory under --workdir. Every run's config has a `study` block
(family, model, epochs, learning_rate, input_shape) and a `budget`.

--dry_run prints every run's steps, analytic FLOPs and estimated core-hours (budget.hardware at budget.mfu)
and the total, without data or an accelerator. Otherwise finished runs (final eval logged and final
checkpoint committed) are skipped, an interrupted one resumes from its checkpoint, and after the last run the
analysis (train.analyze) writes WORKDIR/study.md, WORKDIR/study.png and WORKDIR/tensorboard/study.
Rerunning the same command continues where it stopped. A preempted run stops the sweep after saving, with
exit status 75 (cli.PREEMPTED_EXIT); a failing run ends it as `python -m train` would end, with one `error:`
line naming the run: 3 for a non-finite loss, 2 for bad input, 74 for an I/O failure (train/cli.py lists the
statuses). On a pod, launch
this command through `python -m train.launch up ... --command='python -m train.sweep ...'`: every host runs
the same sweep in lockstep, and the launcher's restart loop reruns it after a preemption.
"""
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
import traceback

from absl import flags
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from models import common
from train import cli, compute
from train import metrics as metrics_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module
  next to other commands' modules defines nothing twice)."""
  flags.DEFINE_string('config', None, 'Sweep config file, optionally FILE.py:ARG (passed to get_sweep).')
  flags.DEFINE_string('workdir', None, 'Parent directory of the runs\' workdirs.')
  flags.DEFINE_bool('dry_run', False, 'Print the runs and their estimated cost; train nothing.')
  flags.DEFINE_string('only', None, 'Run only the runs whose name contains this string.')
  flags.DEFINE_bool('analyze', True, 'Analyse the finished runs at the end.')
  flags.DEFINE_multi_string('set', [], 'key=value config overrides for every run, e.g. --set=data.data_dir=DIR.')


@dataclasses.dataclass
class Run:
  name: str
  spec: str  # FILE.py:ARG, what `python -m train --config=` takes for this run alone
  config: object
  steps: int
  flops_per_example: float
  params: int

  @property
  def train_flops(self) -> float:
    return self.flops_per_example * self.steps * self.config.batch_size

  def core_hours(self) -> float | None:
    budget = self.config.get('budget') or {}
    hardware = budget.get('hardware')
    return compute.estimated_core_hours(self.train_flops, hardware, budget.get('mfu') or 1.0) if hardware else None


def _module(path: str):
  if not os.path.isfile(path):
    raise ValueError(f'--config={path}: no such file (run from the repository root).')
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in ('get_config', 'get_sweep', 'run_name'):
    if not hasattr(module, name):
      raise ValueError(f'{path} has no {name}(); a sweep config defines get_config, get_sweep and run_name.')
  return module


@functools.cache
def _param_count_cached(model_name: str, model_json: str, input_shape: tuple[int, ...]) -> int:
  from train import loop
  model = loop.build_model(ml_collections.ConfigDict({'model_name': model_name, 'model': json.loads(model_json)}))
  return common.count_params(model, (1, *input_shape))


def _param_count(config, input_shape) -> int:
  """Parameters of the run's model (traced abstractly once per distinct model of the sweep)."""
  return _param_count_cached(config.model_name, json.dumps(config.model.to_dict(), sort_keys=True), input_shape)


def plan(config_spec: str, overrides=()) -> list[Run]:
  """The sweep's runs, each with its config (overrides applied, total_steps from the budget) and estimates."""
  path, _, arg = config_spec.partition(':')
  module = _module(path)
  runs = []
  for run_arg in module.get_sweep(arg or None):
    spec = f'{path}:{run_arg}'
    config = cli.load_config(spec, [f'--config.{o}' for o in overrides])
    if 'study' not in config or 'input_shape' not in config.study:
      raise ValueError(f'{spec}: a sweep run needs config.study with input_shape (and family, model, epochs).')
    input_shape = tuple(config.study.input_shape)
    num_train = config.data.get('num_train_examples')
    steps = (compute.resolve_budget(config, num_train_examples=num_train, input_shape=input_shape)
             if config.get('budget') else config.total_steps)
    with config.unlocked():
      config.total_steps = steps
      params = _param_count(config, input_shape)
      config.study.params = params
    runs.append(Run(module.run_name(run_arg), spec, config, steps,
                    compute.train_flops_per_example(config, input_shape), params))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'{path}: run_name gives the same name to several runs; make it include every swept value.')
  return runs


def finished(workdir: str) -> bool:
  """Has this run logged its final eval and committed its final checkpoint? A run killed between the two has
  the eval line but no final state to load, so it is resumed, not skipped."""
  try:
    total = json.loads(epath.Path(workdir, 'config.json').read_text())['total_steps']
    last = metrics_lib.read_metrics(workdir)[-1]
  except (OSError, IndexError, KeyError, ValueError):  # json.JSONDecodeError is a ValueError
    return False
  if last.get('step') != total or 'eval/loss' not in last:
    return False
  final = epath.Path(workdir, 'checkpoints', str(total))
  # Orbax's commit: the rename of its temporary directory, or commit_success.txt where renames are not atomic.
  return final.is_dir() and ocp.utils.is_checkpoint_finalized(final)


class RunFailed(Exception):
  """A run of the sweep stopped on an error: the one-line message and the exit status the sweep ends with."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


def table(runs: list[Run]) -> str:
  lines = [f'{"run":<24} {"params":>10} {"steps":>9} {"GFLOP/ex":>9} {"train FLOPs":>12} {"est. core-h":>12}']
  for r in runs:
    hours = r.core_hours()
    lines.append(f'{r.name:<24} {r.params:>10,} {r.steps:>9,} {r.flops_per_example / 1e9:>9.4g} '
                 f'{r.train_flops:>12.4g} {hours if hours is not None else float("nan"):>12.4g}')
  hours = [r.core_hours() for r in runs]
  total = sum(h for h in hours if h is not None)
  budget = runs[0].config.get('budget') or {}
  lines.append(f'{len(runs)} runs | {sum(r.train_flops for r in runs):.4g} training FLOPs | est. {total:.4g} '
               f'core-hours on {budget.get("hardware")} at mfu {budget.get("mfu") or 1:g}')
  return '\n'.join(lines)


def train_all(runs: list[Run], workdir: str) -> bool:
  """Trains the unfinished runs in order; False when one was preempted (rerun the sweep to continue).

  Raises RunFailed, naming the run and carrying the exit status of `python -m train` (cli.exit_status), on a
  non-finite loss, bad input or an I/O error.
  """
  from train import loop
  done_flops, total_flops = 0.0, sum(r.train_flops for r in runs)
  start = time.time()
  for i, run in enumerate(runs):
    run_dir = os.path.join(workdir, run.name)
    if finished(run_dir):
      print(f'[{i + 1}/{len(runs)}] {run.name}: finished earlier, skipped', flush=True)
    else:
      print(f'[{i + 1}/{len(runs)}] {run.name}: {run.steps} steps of batch {run.config.batch_size} '
            f'({run.train_flops:.3g} FLOPs)', flush=True)
      try:
        result = loop.train(run.config, run_dir)
      except Exception as e:  # noqa: BLE001 - classified as `python -m train` does; a bug propagates as it is.
        code = cli.exit_status(e)
        if code == cli.UNEXPECTED_EXIT:
          raise
        raise RunFailed(f'run {run.name}: {cli.summary(e)}', code) from e
      if result['preempted']:
        print('sweep stopped (preempted); rerun the same command to continue.', flush=True)
        return False
    done_flops += run.train_flops
    elapsed = time.time() - start
    print(f'sweep: {i + 1}/{len(runs)} runs, {100 * done_flops / total_flops:.0f}% of the FLOPs, '
          f'{elapsed:.0f} s elapsed', flush=True)
  return True


def report(runs: list[Run], workdir: str) -> str | None:
  """Writes WORKDIR/study.md and WORKDIR/study.png and returns the report (on process 0; None elsewhere)."""
  from train.study import analyze as analyze_lib
  if jax.process_index() != 0:
    return None
  return analyze_lib.write_report([os.path.join(workdir, r.name) for r in runs], workdir)


def main(argv):
  cli.no_arguments(argv)
  cli.quiet_logging()
  from train import distributed
  from train.study import analyze as analyze_lib
  with cli.failing_on(ValueError, FileNotFoundError, analyze_lib.StudyError):
    distributed.initialize()  # Every host of a pod runs the same sweep; settings from the environment.
    if not FLAGS.config or not (FLAGS.workdir or FLAGS.dry_run):
      raise ValueError('--config and --workdir are required, e.g. --config=configs/convnets_at_scale_cpu.py '
                       '--workdir=workdirs/convnets_at_scale_cpu')
    runs = plan(FLAGS.config, FLAGS.set)
    if FLAGS.only:
      runs = [r for r in runs if FLAGS.only in r.name]
      if not runs:
        raise ValueError(f'--only={FLAGS.only!r} matches no run name.')
    print(table(runs), flush=True)
    if FLAGS.dry_run:
      return
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if not jax.config.jax_compilation_cache_dir:
      # The runs of one model differ only in their length, which the compiled steps do not depend on (the
      # learning rate is an input): XLA's persistent cache compiles each model once for the whole ladder.
      jax.config.update('jax_compilation_cache_dir', os.path.join(FLAGS.workdir, 'compilation_cache'))
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
    try:
      if not train_all(runs, FLAGS.workdir):
        sys.exit(cli.PREEMPTED_EXIT)
    except RunFailed as e:
      if FLAGS.get_flag_value('traceback', False):
        traceback.print_exception(e.__cause__)
      cli.fail(e, e.code)
    text = report(runs, FLAGS.workdir) if FLAGS.analyze else None
  if text:
    print(text, end='')
    print(f'wrote {FLAGS.workdir}/study.md, {FLAGS.workdir}/study.png and {FLAGS.workdir}/tensorboard/study',
          flush=True)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
