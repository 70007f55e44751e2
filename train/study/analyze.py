r"""Analyses a compute-budget study: python -m train.analyze --workdirs='workdirs/study/*' --out=DIR

Reads every matched pretraining workdir's config.json (its `study` block: family, model, params, epochs,
learning_rate; optionally select_eval and report_eval, the evaluators whose final loss chooses the learning
rate and is reported: `eval/<name>/loss`, else `eval/loss`) and metrics.jsonl (those losses and the compute:
analytic FLOPs, measured core-hours, utilisation), and WORKDIR/finetune where a sweep's finetune stage wrote
one (its final top-1: the evaluator of its config.study.report_eval, else `test` if it has one, else
`eval/accuracy`). Then writes DIR/study.md (every run with the chosen learning rates marked, the frontier of
the chosen runs, per-family power laws, the compute-optimal allocation, the finetuned top-1 against
pretraining compute with a power law of its error, the estimated and measured compute with each family's
utilisation, the ConvNet-vs-ViT answer in both terms, and one line per fit that needs more runs than it has),
DIR/study.png (loss vs compute, log-log; a second panel of finetuned top-1 error vs pretraining compute when
there are finetuned runs) and the figure as TensorBoard scalars under DIR/tensorboard/study (x: step =
round(1000 x log10(compute))), and prints the report. Unfinished runs are listed and left out.

  --compute=flops              final compute/train_flops (default)
  --compute=core_hours         final compute/core_hours (devices x wall time as measured)
  --compute=budget_core_hours  train FLOPs / (peak FLOP/s per device of budget.hardware x budget.mfu) / 3600
  --irreducible                fit loss = E + a * C^b instead of a * C^b (and the top-1 error likewise)
"""
import dataclasses
import json
import math
import os
import re
import sys
import tempfile

from absl import flags
from etils import epath
import numpy as np

from train import cli
from train import compute as compute_lib
from train import metrics as metrics_lib
from train import paths as paths_lib
from train.study import report as report_lib
from train.study import scaling

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module
  next to other commands' modules defines nothing twice)."""
  flags.DEFINE_multi_string('workdirs', None, 'Run workdirs or glob patterns (repeatable).')
  flags.DEFINE_string('out', None, 'Directory for study.md and study.png.')
  flags.DEFINE_enum('compute', 'flops', ['flops', 'core_hours', 'budget_core_hours'],
                    'What a run\'s compute is.')
  flags.DEFINE_bool('irreducible', False, 'Fit loss = E + a * C^b (E >= 0).')
  flags.DEFINE_float('confidence', 0.95, 'Confidence level of the intervals.')
  flags.DEFINE_integer('levels', 8, 'Log-spaced compute levels for the compute-optimal allocation '
                       '(used when the runs share no compute budgets).')
  flags.DEFINE_list('peak_flops', [], 'hardware=FLOP/s per device (core), adds to or overrides the '
                    'built-in table, e.g. tpu_v4=137.5e12; a run\'s budget.peak_flops wins over both.')


# Peak per core that a core-hour counts (train.compute's table; 'cpu' has no fixed peak).
PEAK_FLOPS = {name: peak for name, peak in compute_lib.PEAK_FLOPS.items() if peak}
STUDY_KEYS = ('family', 'model', 'params', 'epochs', 'learning_rate')
COMPUTE_NAMES = {'flops': 'train_flops', 'core_hours': 'core_hours', 'budget_core_hours': 'budget_core_hours'}
COMPUTE_KEYS = {'flops': ('compute/train_flops',),
                'budget_core_hours': ('compute/train_flops',),
                'core_hours': ('compute/core_hours',)}


class StudyError(ValueError):
  """Bad input: one line saying what is wrong and what to do."""


def _hardware_key(name: str) -> str:
  return re.sub(r'[^a-z0-9]', '', name.lower())


def parse_peak_flops(entries) -> dict[str, float]:
  """The built-in table updated by `hardware=FLOP/s` entries, keyed by the normalised hardware name."""
  table = {_hardware_key(k): v for k, v in PEAK_FLOPS.items()}
  for entry in entries:
    name, _, value = entry.partition('=')
    try:
      table[_hardware_key(name)] = float(value)
    except ValueError:
      table[_hardware_key(name)] = 0.0
    if not (name and table[_hardware_key(name)] > 0):
      raise StudyError(f'--peak_flops entry {entry!r} is not hardware=FLOP/s per device, e.g. tpu_v4=137.5e12')
  return table


def find_workdirs(patterns) -> list[str]:
  """Directories matched by the patterns (globs or plain paths), in order, each once."""
  found = []
  for pattern in patterns or ():
    for path in paths_lib.glob(pattern):
      if epath.Path(path).is_dir() and path not in found:
        found.append(path)
  if not found:
    raise StudyError(f'no workdirs matched --workdirs={list(patterns or [])}; pass run directories or a glob '
                     "such as --workdirs='workdirs/study/*' (quoted, so the shell leaves it to this tool)")
  return found


def read_run(workdir: str, compute: str = 'flops', peak_flops=None) -> scaling.Run | str:
  """The workdir's Run, or a one-line note of why it is unfinished."""
  paths = {name: os.path.join(workdir, name) for name in ('config.json', 'metrics.jsonl')}
  for name, path in paths.items():
    if not epath.Path(path).is_file():
      raise StudyError(f'{workdir} has no {name}: not a training workdir (python -m train writes both); '
                       'leave it out of --workdirs')
  try:
    config = json.loads(epath.Path(paths['config.json']).read_text())
    records = metrics_lib.read_metrics(workdir)  # A torn last line (a run still writing) is skipped.
  except (json.JSONDecodeError, ValueError) as e:
    raise StudyError(f'{workdir}: unreadable JSON ({cli.one_line(e)}); fix or remove the file') from None
  study = config.get('study')
  if not isinstance(study, dict):
    raise StudyError(f'{paths["config.json"]} has no `study` block (family, model, params, epochs, '
                     'learning_rate): train study runs with a config that sets config.study')
  if not study.get('params'):  # The loop logs the parameter count; a study block may leave it out.
    study['params'] = next((r['compute/params'] for r in records if 'compute/params' in r), None)
  missing = [k for k in STUDY_KEYS if study.get(k) is None]
  if missing:
    raise StudyError(f'{paths["config.json"]}: the study block lacks {missing}; it needs {list(STUDY_KEYS)}')

  report_key, select_key = _eval_key(study, 'report_eval'), _eval_key(study, 'select_eval')
  total = config.get('total_steps')
  last = records[-1] if records else {}
  step = last.get('step', 0)
  if not records or (total is not None and step < total) or report_key not in last or select_key not in last:
    why = f'at step {step}/{total if total is not None else "?"}' if records else 'nothing logged yet'
    for key in dict.fromkeys((report_key, select_key)):
      if records and key not in last:
        why += f', no {key} at its last logged step'
    return f'incomplete, left out: {workdir} ({why})'

  keys = COMPUTE_KEYS[compute]
  value = next((r[k] for r in reversed(records) for k in keys if k in r), None)
  if value is None:
    raise StudyError(f'{paths["metrics.jsonl"]} logs no {keys[0]}: train with compute accounting, or choose '
                     'another --compute')
  peak_flops = peak_flops or parse_peak_flops([])
  if compute == 'budget_core_hours':
    value /= _device_flops(config, workdir, peak_flops) * 3600.0
  numbers = {'params': study['params'], 'epochs': study['epochs'], 'compute': value, report_key: last[report_key],
             select_key: last[select_key]}
  bad = [k for k, v in numbers.items() if not (isinstance(v, (int, float)) and 0 < v < math.inf)]
  if bad:
    raise StudyError(f'{workdir}: {bad} must be finite positive numbers, got {[numbers[k] for k in bad]}')
  measured = _measured(records, config, workdir, peak_flops)
  return scaling.Run(family=str(study['family']), model=str(study['model']), params=int(study['params']),
                     epochs=float(study['epochs']), learning_rate=float(study['learning_rate']),
                     compute=float(value), loss=float(last[report_key]), workdir=workdir,
                     select_loss=float(last[select_key]), **measured)


def _eval_key(study: dict, field: str) -> str:
  name = study.get(field)
  return f'eval/{name}/loss' if name else 'eval/loss'


def _final(records, key: str):
  return next((r[key] for r in reversed(records) if key in r), None)


def _measured(records, config, workdir: str, peak_flops) -> dict[str, float | None]:
  """A run's analytic train FLOPs, measured core-hours and utilisation as logged, and the core-hours its
  budget estimates (None where its hardware has no known peak, e.g. 'cpu', whose peak is measured per run)."""
  flops, hours, mfu = (_final(records, k) for k in ('compute/train_flops', 'compute/core_hours', 'compute/mfu'))
  estimate = None
  if flops is not None:
    try:
      estimate = flops / (_device_flops(config, workdir, peak_flops) * 3600.0)
    except StudyError:  # No known peak: shown as '-', the report still holds what was measured.
      estimate = None
  return {'train_flops': flops, 'core_hours': hours, 'mfu': mfu, 'budget_core_hours': estimate}


def read_finetune(workdir: str) -> float | str | None:
  """The top-1 of WORKDIR/finetune, the finetune run of pretraining run WORKDIR: None when there is none, a
  note when it is unfinished. The metric: its config.study.report_eval's accuracy if it names one, else the
  `test` evaluator's, else eval/accuracy."""
  finetune = os.path.join(workdir, 'finetune')
  if not epath.Path(finetune, 'config.json').is_file():
    return None
  try:
    config = json.loads(epath.Path(finetune, 'config.json').read_text())
    records = metrics_lib.read_metrics(finetune)
  except (json.JSONDecodeError, ValueError, OSError) as e:
    raise StudyError(f'{finetune}: unreadable ({cli.one_line(e)}); fix or remove the file') from None
  last = records[-1] if records else {}
  name = (config.get('study') or {}).get('report_eval')
  key = f'eval/{name}/accuracy' if name else 'eval/test/accuracy' if 'eval/test/accuracy' in last else 'eval/accuracy'
  total, step = config.get('total_steps'), last.get('step', 0)
  if not records or (total is not None and step < total) or key not in last:
    why = f'at step {step}/{total if total is not None else "?"}' if records else 'nothing logged yet'
    if records and key not in last:
      why += f', no {key} at its last logged step'
    return f'finetune incomplete, left out: {finetune} ({why})'
  top1 = last[key]
  if not (isinstance(top1, (int, float)) and 0 <= top1 <= 1):
    raise StudyError(f'{finetune}: {key} must be a fraction in [0, 1], got {top1!r}')
  return float(top1)


def _device_flops(config, workdir: str, peak_flops: dict[str, float]) -> float:
  """Sustained FLOP/s of one device: its peak (config's budget.peak_flops, else the table) times budget.mfu."""
  budget = config.get('budget') or {}
  hardware, mfu = budget.get('hardware'), budget.get('mfu')
  peak = budget.get('peak_flops') or peak_flops.get(_hardware_key(str(hardware)))
  if not peak and hardware is None:
    raise StudyError(f'{workdir}: config.json has no budget.hardware (nor budget.peak_flops) to turn FLOPs into '
                     'core-hours; use --compute=flops or --compute=core_hours')
  if not peak:
    raise StudyError(f'{workdir}: no peak FLOP/s for budget.hardware={hardware!r}; pass '
                     f'--peak_flops={hardware}=FLOPS_PER_DEVICE (known: {sorted(PEAK_FLOPS)})')
  if not mfu or mfu <= 0:
    raise StudyError(f'{workdir}: budget.mfu={mfu!r} must be a positive utilisation for --compute=budget_core_hours')
  return float(peak) * float(mfu)


def load_runs(patterns, compute: str = 'flops', peak_flops=None) -> tuple[list[scaling.Run], list[str]]:
  """(finished runs, notes on the unfinished ones)."""
  runs, notes = [], []
  for workdir in find_workdirs(patterns):
    run = read_run(workdir, compute, peak_flops)
    if isinstance(run, str):
      notes.append(run)
      continue
    top1 = read_finetune(workdir)
    if isinstance(top1, str):
      notes.append(top1)
    elif top1 is not None:
      run = dataclasses.replace(run, top1=top1)
    runs.append(run)
  if not runs:
    raise StudyError(f'none of the {len(notes)} matched runs has finished; wait for them or check the workdirs')
  return runs, notes


def compute_label(compute: str, workdirs) -> str:
  if compute == 'flops':
    return 'training FLOPs'
  if compute == 'core_hours':
    return 'training compute (core hours, measured)'
  hardware = set()
  for workdir in workdirs:
    config = json.loads(epath.Path(workdir, 'config.json').read_text())
    hardware.add((config.get('budget') or {}).get('hardware'))
  name = re.sub(r'^tpu[_-]?', 'TPU-', f'{hardware.pop()} ') if len(hardware) == 1 else ''
  return f'training compute ({name}core hours, estimated from FLOPs)'


def loss_label(workdirs) -> str:
  """What the report's losses are: the metric chosen on and the one reported, as the runs' study blocks say."""
  keys = set()
  for workdir in workdirs:
    study = json.loads(epath.Path(workdir, 'config.json').read_text()).get('study') or {}
    keys.add((_eval_key(study, 'select_eval'), _eval_key(study, 'report_eval')))
  parts = []
  for select, report in sorted(keys):
    parts.append(f'final held-out `{report}`' + (f', learning rate chosen on `{select}`' if select != report else
                                                  ' (the learning rate is chosen on it too)'))
  return '; '.join(parts)


def tensorboard_step(compute: float) -> int:
  """A run's x position in TensorBoard, whose x axis is an integer step: 1000 x log10(compute), so that the
  curves lie on the report's logarithmic axis (step 12000 is 1e12) and paper-scale FLOPs fit an int64."""
  return round(1000 * math.log10(compute))


def tensorboard_tag(family: str, compute: str, finetuned: bool = False) -> str:
  what = 'finetune_top1_error' if finetuned else 'eval_loss'
  return f'study/{family}/{what}_vs_log10_{COMPUTE_NAMES[compute]}'


def write_tensorboard(study: scaling.Study, out: str, compute: str, label: str, report: str) -> str:
  """The figure of study.png as TensorBoard scalars under OUT/tensorboard/study: per family one tag (see
  tensorboard_tag) at tensorboard_step(compute), drawn by one TensorBoard run per model (each epoch budget's
  best learning rate), one for the frontiers and one for the fitted power laws; with finetuned runs a second
  tag per family, their top-1 error against pretraining compute, drawn the same way; the report as text.
  Replaces what an earlier analysis wrote there. Returns the directory."""
  from tensorboardX import SummaryWriter
  root = epath.Path(out, 'tensorboard', 'study')
  if root.exists():  # A rerun would otherwise add a second, out-of-order copy of every point.
    root.rmtree()
  # A bucket gets the files through a local directory (tensorboardX writes local files without extra packages).
  local = epath.Path(tempfile.mkdtemp(prefix='study_tensorboard_')) if paths_lib.is_url(out) else root
  series: dict[tuple[str, str], dict[int, float]] = {}  # (TensorBoard run, tag) -> {step: loss}

  def add(name, family, points, finetuned=False):
    values = series.setdefault((name, tensorboard_tag(family, compute, finetuned)), {})
    for c, loss in points:  # One value per step: the lowest, as on the frontier.
      step = tensorboard_step(c)
      values[step] = min(values.get(step, math.inf), float(loss))

  for r in scaling.best_per_budget(study.runs):
    add(r.model, r.family, [(r.compute, r.loss)])
  for family, front in study.frontiers.items():
    add('frontier', family, [(r.compute, r.loss) for r in front])
    fit = study.fits[family]
    if isinstance(fit, scaling.PowerLawFit):
      grid = np.geomspace(front[0].compute, front[-1].compute, 17)
      add('power-law fit', family, zip(grid, fit.predict(grid)))
  for r in study.finetuned:
    add(r.model, r.family, [(r.compute, r.top1_error)], finetuned=True)
  for family, front in study.ft_frontiers.items():
    add('frontier', family, [(r.compute, r.top1_error) for r in front], finetuned=True)
    fit = study.ft_fits[family]
    if isinstance(fit, scaling.PowerLawFit):
      grid = np.geomspace(front[0].compute, front[-1].compute, 17)
      add('power-law fit', family, zip(grid, fit.predict(grid)), finetuned=True)
  about = (f'Final held-out loss (or finetuned top-1 error) against {label}; x: step = round(1000 x '
           'log10(compute)), so step 12000 is 1e12.')
  writers = {}
  try:
    for (name, tag), values in series.items():
      if name not in writers:
        writers[name] = SummaryWriter(str(local / re.sub(r'[^\w.+-]', '_', name)))
      for step in sorted(values):  # Ascending: TensorBoard drops points that go back in step.
        writers[name].add_scalar(tag, values[step], step, summary_description=about)
    writers['report'] = SummaryWriter(str(local / 'report'))
    writers['report'].add_text('study/report', report, 0)
  finally:
    for writer in writers.values():
      writer.close()
  if local != root:
    for file in local.glob('*/*'):
      (root / file.parent.name).mkdir(parents=True, exist_ok=True)
      (root / file.parent.name / file.name).write_bytes(file.read_bytes())
    local.rmtree()
  return str(root)


def write_report(patterns, out: str, compute: str = 'flops', irreducible: bool = False, confidence: float = 0.95,
                 num_levels: int = 8, peak_flops=None, scope: str | None = None) -> str:
  """Analyses the runs matched by `patterns`; writes OUT/study.md, OUT/study.png and the figure's scalars
  under OUT/tensorboard/study (write_tensorboard); returns the report."""
  runs, notes = load_runs(patterns, compute, peak_flops)
  study = scaling.analyze(runs, irreducible=irreducible, confidence=confidence, num_levels=num_levels)
  label = compute_label(compute, [r.workdir for r in runs])
  report = report_lib.markdown(study, label, notes, loss_label([r.workdir for r in runs]), scope)
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  epath.Path(out, 'study.md').write_text(report)
  with epath.Path(out, 'study.png').open('wb') as f:  # A file object: matplotlib cannot open gs:// paths itself.
    report_lib.plot(study, f, label)
  write_tensorboard(study, out, compute, label, report)
  return report


def main(argv):
  cli.no_arguments(argv, 'pass workdirs with --workdirs=')
  if not FLAGS.out:
    cli.fail('--out is required: the directory for study.md and study.png')
  with cli.failing_on(StudyError):
    report = write_report(FLAGS.workdirs, FLAGS.out, FLAGS.compute, FLAGS.irreducible, FLAGS.confidence,
                          FLAGS.levels, parse_peak_flops(FLAGS.peak_flops))
  print(report, end='')
  print(f'wrote {FLAGS.out}/study.md, {FLAGS.out}/study.png and {FLAGS.out}/tensorboard/study', file=sys.stderr)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
