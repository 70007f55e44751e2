r"""Runs a study: expands a sweep config into named runs, trains them one after another, then analyses them.

  python -m train.sweep --config=configs/convnets_at_scale_cpu.py --workdir=workdirs/convnets_at_scale_cpu
  python -m train.sweep --config=configs/convnets_at_scale.py --workdir=gs://BUCKET/study --dry_run

A sweep config is an ordinary config file (its `get_config(arg)` builds one run, so any single run is also
`python -m train --config=FILE:ARG`) that adds `get_sweep(arg) -> [ARG, ...]`, the runs' config arguments,
and `run_name(ARG) -> str`, each run's directory under --workdir. Every run's config has a `study` block
(family, model, epochs, learning_rate, input_shape; optionally select_eval and report_eval, the evaluators
whose `eval/<name>/loss` chooses among learning rates and is reported: `eval/loss` without them) and a `budget`.

A finetune stage (optional) is two more names in the sweep config:
  finetune_config(ARG) -> 'FILE.py:ARG2' | None: the config of the finetune run of pretraining run ARG (None:
      not finetuned). The sweep sets its `init_params` to the pretraining run's workdir (an override, as
      --set) and trains it in WORKDIR/<run name>/finetune.
  FINETUNE_SELECT: which finished pretraining runs are finetuned: 'best_lr' (the default: per (family, model,
      epochs), the run of the lowest selection loss, i.e. the learning rate chosen on held-out data),
      'frontier' (the best_lr runs on their family's selection-loss-vs-FLOPs frontier) or 'all'.

--stage=all (the default) pretrains every run, selects, then finetunes the selected; --stage=pretrain and
--stage=finetune run one stage (the latter needs every pretraining run finished). --only=TEXT keeps the
pretraining runs whose name contains TEXT; the finetune stage selects among those. --set overrides apply to
the runs of both stages.

--dry_run prints every run's steps, analytic FLOPs and estimated core-hours (budget.hardware at budget.mfu),
then one finetune row per selection group ('F3+_2ep_lr*/finetune': the learning rate is chosen later; the
finetune config's budget.hardware and mfu, else the pretraining run's) and the total of both stages, without
data or an accelerator. Otherwise finished runs (final eval logged and final checkpoint committed) are
skipped, an interrupted one resumes from its checkpoint, and after the last run the analysis (train.analyze)
writes WORKDIR/study.md, WORKDIR/study.png and WORKDIR/tensorboard/study. Rerunning the same command
continues where it stopped. A preempted run (of either stage) stops the sweep after saving, with exit status
75 (cli.PREEMPTED_EXIT); a failing run ends it as `python -m train` would end, with one `error:` line naming
the run: 3 for a non-finite loss, 2 for bad input, 74 for an I/O failure (train/cli.py lists the statuses).
On a pod, launch this command through `python -m train.launch up ... --command='python -m train.sweep ...'`:
every host runs the same sweep in lockstep, and the launcher's restart loop reruns it after a preemption.
"""
from collections.abc import Callable
import dataclasses
import functools
import importlib.util
import json
import math
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
from train.study import prewarm

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
  flags.DEFINE_bool('prewarm', True, 'On a CPU, compile later runs\' train steps in a background process while '
                    'the earlier runs train (train/study/prewarm.py).')
  flags.DEFINE_enum('stage', 'all', list(STAGES), 'Which stages to run: pretraining, then finetuning the selected '
                    'runs (all), or one of them.')


STAGES = ('all', 'pretrain', 'finetune')
SELECTIONS = ('best_lr', 'frontier', 'all')


@dataclasses.dataclass
class Run:
  name: str
  spec: str  # FILE.py:ARG, what `python -m train --config=` takes for this run alone
  config: object
  steps: int
  flops_per_example: float
  params: int
  # The budget (hardware, mfu) of the core-hour estimate: config.budget unless a finetune config has none.
  estimate: dict | None = None
  overrides: tuple[str, ...] = ()  # key=value overrides of `spec` that give `config` (before total_steps)

  @property
  def arg(self) -> str:
    return self.spec.partition(':')[2]

  @property
  def train_flops(self) -> float:
    return self.flops_per_example * self.steps * self.config.batch_size

  def core_hours(self) -> float | None:
    budget = self.estimate or self.config.get('budget') or {}
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
  from train import build, loop
  config = ml_collections.ConfigDict({'model_name': model_name, 'model': json.loads(model_json)})
  module = build.model_module(config)
  if len(input_shape) == 3 and hasattr(module, 'param_count'):  # An image model's own count (NFNet's: analytic).
    return module.param_count(json.loads(model_json), input_shape[:2], channels=input_shape[2])
  return common.count_params(loop.build_model(config), (1, *input_shape))


def _param_count(config, input_shape) -> int:
  """Parameters of the run's model (traced abstractly once per distinct model of the sweep)."""
  return _param_count_cached(config.model_name, json.dumps(config.model.to_dict(), sort_keys=True), input_shape)


def _load_run(name: str, spec: str, overrides=(), config=None, channels: int = 3) -> Run:
  """One run of `spec` with `overrides` ('key=value'; `config` if already loaded so), total_steps from its
  budget, and its estimates (of images of `channels` where its config gives no input shape)."""
  config = config or cli.load_config(spec, [f'--config.{o}' for o in overrides])
  input_shape = _train_input_shape(config, spec, channels)
  num_train = config.data.get('num_train_examples')
  steps = (compute.resolve_budget(config, num_train_examples=num_train, input_shape=input_shape)
           if config.get('budget') else config.total_steps)
  with config.unlocked():
    config.total_steps = steps
  params = _param_count(config, input_shape)
  return Run(name, spec, config, steps, compute.train_flops_per_example(config, input_shape), params,
             overrides=tuple(overrides))


def _train_input_shape(config, spec: str, channels: int) -> tuple[int, ...]:
  """config.study.input_shape, else (N, N, channels) from the last crop or resize of data.pp_train."""
  study = config.get('study') or {}
  if study.get('input_shape'):
    return tuple(study['input_shape'])
  size = compute.pp_image_size(str(config.data.get('pp_train') or ''))
  if size is None:
    raise ValueError(f'{spec}: cannot tell the training input shape for the FLOP estimate; set '
                     'config.study.input_shape (e.g. (384, 384, 3)) in that config.')
  return (size, size, channels)


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
    run = _load_run(module.run_name(run_arg), spec, overrides, config=config)
    with run.config.unlocked():
      run.config.study.params = run.params
    runs.append(run)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'{path}: run_name gives the same name to several runs; make it include every swept value.')
  return runs


@dataclasses.dataclass(frozen=True)
class FinetuneStage:
  config_of: Callable[[str], str | None]  # The sweep config's finetune_config(ARG).
  select: str  # One of SELECTIONS.


def finetune_stage(config_spec: str) -> FinetuneStage | None:
  """The sweep config's finetune stage, or None when it declares none (no finetune_config)."""
  path = config_spec.partition(':')[0]
  module = _module(path)
  if not hasattr(module, 'finetune_config'):
    return None
  select = getattr(module, 'FINETUNE_SELECT', 'best_lr')
  if select not in SELECTIONS:
    raise ValueError(f'{path}: FINETUNE_SELECT={select!r} is unknown; set it to one of {list(SELECTIONS)}.')
  return FinetuneStage(module.finetune_config, select)


def selection_groups(runs: list[Run], select: str) -> list[list[Run]]:
  """The pretraining runs one finetune run is chosen among: each run alone for 'all', else the runs of one
  (family, model, epochs), which differ in their learning rate."""
  if select == 'all':
    return [[r] for r in runs]
  groups = {}
  for r in runs:
    study = r.config.study
    groups.setdefault((study.family, study.model, float(study.epochs)), []).append(r)
  return list(groups.values())


def group_name(group: list[Run]) -> str:
  """'F3+_2ep_lr*' for runs named F3+_2ep_lr0.4, F3+_2ep_lr0.8, ...: where their names differ, a '*'."""
  names = [r.name for r in group]
  if len(set(names)) == 1:
    return names[0]
  prefix = os.path.commonprefix(names)
  suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
  # Whole numbers only: 'lr0.4' and 'lr0.8' share 'lr0.', yet the learning rate is all of '0.4'.
  return f'{prefix.rstrip("0123456789.")}*{suffix.lstrip("0123456789.")}'


def eval_key(config, field: str) -> str:
  """The final-loss metric of the evaluator config.study.<field> names ('select_eval', 'report_eval'):
  eval/<name>/loss, or eval/loss where the study block names none."""
  name = (config.get('study') or {}).get(field)
  return f'eval/{name}/loss' if name else 'eval/loss'


def _final(run_dir: str, key: str) -> float | None:
  try:
    return metrics_lib.read_metrics(run_dir)[-1].get(key)
  except (OSError, IndexError, ValueError):
    return None


def choose(runs: list[Run], workdir: str, select: str) -> list[Run]:
  """The pretraining runs to finetune, by `select` (see SELECTIONS) on each run's final selection loss
  (eval_key(config, 'select_eval')). ValueError naming the first run that is missing or unfinished."""
  from train.study import scaling
  losses = {}
  for r in runs:
    run_dir = os.path.join(workdir, r.name)
    if not finished(run_dir):
      state = 'unfinished' if epath.Path(run_dir, 'config.json').exists() else 'missing'
      raise ValueError(f'the finetune stage needs pretraining run {r.name}, which is {state} ({run_dir}); '
                       'run the pretraining stage first: the same command with --stage=pretrain (or --stage=all)')
    key = eval_key(r.config, 'select_eval')
    losses[r.name] = _final(run_dir, key)
    if losses[r.name] is None:
      raise ValueError(f'pretraining run {r.name} logged no final {key}, the selection metric; set '
                       'config.study.select_eval to one of its evaluators (or leave it unset for eval/loss)')
  if select == 'all':
    return list(runs)
  best = [min(g, key=lambda r: losses[r.name]) for g in selection_groups(runs, select)]
  if select == 'frontier':
    kept = set()
    for family in {r.config.study.family for r in best}:
      points = [(r.train_flops, losses[r.name], r.name) for r in best if r.config.study.family == family]
      kept.update(p[2] for p in scaling.frontier(points))
    best = [r for r in best if r.name in kept]
  return best


def finetune_run(pretrain: Run, spec: str, workdir: str, overrides=(), name: str | None = None) -> Run:
  """The finetune run of `pretrain` (config `spec`, init_params its workdir under `workdir`); its core-hour
  estimate uses the pretraining run's hardware and mfu where the finetune budget names no hardware."""
  init = os.path.join(workdir, pretrain.name)
  run = _load_run(f'{name or pretrain.name}/finetune', spec, [*overrides, f'init_params={init}'],
                  channels=pretrain.config.study.input_shape[-1])
  if not (run.config.get('budget') or {}).get('hardware'):
    theirs = pretrain.config.get('budget') or {}
    run.estimate = {'hardware': theirs.get('hardware'), 'mfu': theirs.get('mfu')}
  return run


def finetune_runs(chosen: list[Run], stage: FinetuneStage, workdir: str, overrides=()) -> list[Run]:
  """The finetune runs of the chosen pretraining runs (those whose finetune_config is not None)."""
  runs = []
  for r in chosen:
    spec = stage.config_of(r.arg)
    if spec is not None:
      runs.append(finetune_run(r, spec, workdir, overrides))
  return runs


def finetune_estimates(runs: list[Run], stage: FinetuneStage, workdir: str, overrides=()) -> list[Run]:
  """One finetune run per selection group, named for the group ('F3+_2ep_lr*/finetune'), for the estimates
  before pretraining has chosen: 'frontier' keeps a subset of these, known only after pretraining."""
  rows = []
  for group in selection_groups(runs, stage.select):
    spec = stage.config_of(group[0].arg)
    if spec is not None:
      rows.append(finetune_run(group[0], spec, workdir, overrides, name=group_name(group)))
  return rows


def finished(workdir: str) -> bool:
  """Has this run logged its final eval and committed its final checkpoint? A run killed between the two has
  the eval line but no final state to load, so it is resumed, not skipped."""
  try:
    total = json.loads(epath.Path(workdir, 'config.json').read_text())['total_steps']
    last = metrics_lib.read_metrics(workdir)[-1]
  except (OSError, IndexError, KeyError, ValueError):  # json.JSONDecodeError is a ValueError
    return False
  if last.get('step') != total or not any(k.startswith('eval/') and k.endswith('/loss') for k in last):
    return False
  final = epath.Path(workdir, 'checkpoints', str(total))
  # Orbax's commit: the rename of its temporary directory, or commit_success.txt where renames are not atomic.
  return final.is_dir() and ocp.utils.is_checkpoint_finalized(final)


class RunFailed(Exception):
  """A run of the sweep stopped on an error: the one-line message and the exit status the sweep ends with."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


def _rows(runs: list[Run], width: int) -> list[str]:
  lines = []
  for r in runs:
    hours = r.core_hours()
    lines.append(f'{r.name:<{width}} {r.params:>10,} {r.steps:>9,} {r.flops_per_example / 1e9:>9.4g} '
                 f'{r.train_flops:>12.4g} {hours if hours is not None else math.nan:>12.4g}')
  return lines


def _total(runs: list[Run], what: str) -> tuple[str, float]:
  hours = sum(h for h in (r.core_hours() for r in runs) if h is not None)
  budget = runs[0].estimate or runs[0].config.get('budget') or {}
  return (f'{len(runs)} {what} | {sum(r.train_flops for r in runs):.4g} training FLOPs | est. {hours:.4g} '
          f'core-hours on {budget.get("hardware")} at mfu {budget.get("mfu") or 1:g}'), hours


def table(runs: list[Run], finetune: list[Run] = (), select: str = 'best_lr') -> str:
  """The pretraining runs and their total; then, given `finetune` (finetune_estimates), the finetune stage's
  rows and total, and the total of both stages."""
  width = max(24, *(len(r.name) for r in [*runs, *finetune]))
  lines = [f'{"run":<{width}} {"params":>10} {"steps":>9} {"GFLOP/ex":>9} {"train FLOPs":>12} {"est. core-h":>12}']
  lines += _rows(runs, width)
  line, hours = _total(runs, 'runs')
  lines.append(line)
  if finetune:
    which = {'best_lr': 'the run of the learning rate chosen on held-out data, per (family, model, epochs)',
             'frontier': 'the best-learning-rate runs on the loss-vs-compute frontier (at most these rows)',
             'all': 'every pretraining run'}[select]
    lines.append(f'finetune stage: {which}')
    lines += _rows(finetune, width)
    ft_line, ft_hours = _total(finetune, 'finetune runs')
    lines.append(ft_line)
    lines.append(f'both stages: {len(runs) + len(finetune)} runs | '
                 f'{sum(r.train_flops for r in [*runs, *finetune]):.4g} training FLOPs | est. {hours + ft_hours:.4g} '
                 'core-hours')
  return '\n'.join(lines)


def train_all(runs: list[Run], workdir: str, prewarming=None) -> bool:
  """Trains the unfinished runs in order; False when one was preempted (rerun the sweep to continue).
  `prewarming`: (cache directory, process) of train.study.prewarm compiling later runs' steps meanwhile.

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
      if prewarming:
        prewarm.wait_for(run.config, *prewarming)
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


def report(runs: list[Run], workdir: str, scope: str | None = None) -> str | None:
  """Writes WORKDIR/study.md and WORKDIR/study.png and returns the report (on process 0; None elsewhere);
  `scope` is the sweep config's STUDY_SCOPE (what runs of this size can and cannot show), closing the report."""
  from train.study import analyze as analyze_lib
  if jax.process_index() != 0:
    return None
  return analyze_lib.write_report([os.path.join(workdir, r.name) for r in runs], workdir, scope=scope)


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
    stage = finetune_stage(FLAGS.config) if FLAGS.stage != 'pretrain' else None
    if FLAGS.stage == 'finetune' and stage is None:
      raise ValueError(f'--stage=finetune: {FLAGS.config.partition(":")[0]} declares no finetune stage; add '
                       'finetune_config(ARG) to it, or run --stage=pretrain')
    # Loaded before any training, so a broken finetune config fails now, not after the pretraining.
    estimates = finetune_estimates(runs, stage, FLAGS.workdir or 'WORKDIR', FLAGS.set) if stage else []
    print(table(runs, estimates, stage.select if stage else 'best_lr'), flush=True)
    if FLAGS.dry_run:
      return
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if not jax.config.jax_compilation_cache_dir:
      # The runs of one model differ only in their length, which the compiled steps do not depend on (the
      # learning rate is an input): XLA's persistent cache compiles each model once for the whole ladder.
      jax.config.update('jax_compilation_cache_dir', os.path.join(FLAGS.workdir, 'compilation_cache'))
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
    cache_dir = jax.config.jax_compilation_cache_dir
    todo = [r for r in (runs if FLAGS.stage != 'finetune' else []) + estimates
            if not finished(os.path.join(FLAGS.workdir, r.name))]
    process = prewarm.start(todo, cache_dir) if FLAGS.prewarm else None
    try:
      if FLAGS.stage != 'finetune' and not train_all(runs, FLAGS.workdir, (cache_dir, process)):
        sys.exit(cli.PREEMPTED_EXIT)
      if stage is not None:
        finetunes = finetune_runs(choose(runs, FLAGS.workdir, stage.select), stage, FLAGS.workdir, FLAGS.set)
        print(f'finetune stage ({stage.select}): ' + ', '.join(r.name for r in finetunes), flush=True)
        if not train_all(finetunes, FLAGS.workdir, (cache_dir, process)):
          sys.exit(cli.PREEMPTED_EXIT)
    except RunFailed as e:
      if FLAGS.get_flag_value('traceback', False):
        traceback.print_exception(e.__cause__)
      cli.fail(e, e.code)
    finally:
      prewarm.stop(process)
    scope = getattr(_module(FLAGS.config.partition(':')[0]), 'STUDY_SCOPE', None)
    text = report(runs, FLAGS.workdir, scope) if FLAGS.analyze else None
  if text:
    print(text, end='')
    print(f'wrote {FLAGS.workdir}/study.md, {FLAGS.workdir}/study.png and {FLAGS.workdir}/tensorboard/study',
          flush=True)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
