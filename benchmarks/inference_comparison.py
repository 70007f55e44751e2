r"""At matched accuracy, is an NFNet or a ViT cheaper to run? Writes OUT/inference.md and OUT/inference.png.

  python -m benchmarks.inference_comparison [--measure] [--out=workdirs/inference] \
      [--study_workdir=workdirs/convnets_at_scale_cpu]

1. The published accuracy-matched models (benchmarks/inference_models.py: NFNet F0-F7+ against ViT B/16 to
   G/14 and SoViT-400m/14 at their ImageNet top-1 and evaluation resolution): parameters and FLOPs per image
   from our models' analytic counters beside the published figures (one unit: FLOPs = 2 x MACs), XLA's FLOPs,
   and XLA's memory analysis of the eval forward compiled for abstract arguments (batch 1 and per extra image).
2. The resolution sweep: F0, F1, ViT-B/16 and L/16 from 128 to 512 pixels (FLOPs and XLA temporaries).
3. The compute-budget study's own CPU-trained runs (the main job's workdir; skipped with a note when absent):
   each family's cheapest finetuned model at each accuracy both families reach, loaded with the run loader and
   measured (`python -m benchmarks.inference --workdir=...` in a fresh process each).
4. --measure: NFNet-F0 at 256 and ViT-B/16 at 384 timed on this machine at --batch_sizes, with timm's
   dm_nfnet_f0 and vit_base_patch16_384 beside them (float32; F0 with conv_impl=taps, the fast grouped
   convolution on a CPU). Minutes on 2 cores.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

from absl import flags
from etils import epath

from benchmarks import inference_models as im
from benchmarks import inference_plot
from benchmarks import inference_report
from models import nfnet, vit
from train import cli
from train.study import analyze

FLAGS = flags.FLAGS
MODULES = {'nfnet': nfnet, 'vit': vit}
# --measure: (label, config, overrides, timm peer)
MEASURED = (
    ('NFNet-F0@256', 'configs/nfnet_i1k.py:variant=F0', ('--config.model.dtype=float32',
                                                         '--config.model.conv_impl=taps'), 'timm:dm_nfnet_f0', 256),
    ('ViT-B/16@384', 'configs/vit_i1k.py:variant=B/16', ('--config.model.dtype=float32', '--config.model.scan=False'),
     'timm:vit_base_patch16_384', 384),
)


def define_flags() -> None:
  flags.DEFINE_string('out', 'workdirs/inference', 'Directory for inference.md, inference.png, inference.json.')
  flags.DEFINE_bool('measure', False, 'Also time F0@256 and ViT-B/16@384 here, beside timm (minutes).')
  flags.DEFINE_list('batch_sizes', ['1', '8'], 'With --measure: batch sizes.')
  flags.DEFINE_integer('repeats', 3, 'With --measure: timed calls per row (the study runs take 20).')
  flags.DEFINE_string('study_workdir', 'workdirs/convnets_at_scale_cpu', 'The main job\'s workdir (its runs).')
  flags.DEFINE_integer('study_batch', 64, 'Throughput batch for the study\'s models (and batch 1).')
  flags.DEFINE_float('tolerance', 0.5, 'Study runs: a run counts as reaching accuracy A from A - tolerance '
                     '(points of top-1).')
  flags.DEFINE_integer('memory_batch', 8, 'XLA memory per extra image from batch 1 and this batch.')


def run_inference(args, log=print) -> list[dict]:
  """Rows of `python -m benchmarks.inference ARGS` in a fresh process (its own peak RSS, its own threads)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'rows.json')
    cmd = [sys.executable, '-m', 'benchmarks.inference', *args, f'--json={out}']
    log('$ ' + ' '.join(cmd[1:-1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      lines = proc.stderr.strip().splitlines()
      raise ValueError(f'benchmarks.inference {" ".join(args)} failed: {lines[-1] if lines else "no output"}')
    log(proc.stdout.rstrip())
    with open(out) as f:
      return json.load(f)


def published(memory_batch: int, log=print) -> list[dict]:
  rows = []
  for e in im.ENTRIES:
    rows.append(dict(label=e.label, family=e.family, name=e.name, resolution=e.resolution, top1=e.top1,
                     pretrain=e.pretrain, published_params_m=e.params_m, published_gflops=e.gflops, source=e.source,
                     **im.cost(e, memory_batch)))
    r = rows[-1]
    log(f'  {e.label}: {r["params"] / 1e6:.1f}M params, {r["gflops"]:.4g} GFLOPs/img (XLA {r["xla_gflops"]:.4g}), '
        f'XLA temp {r["temp1_mib"]:.0f} MiB at batch 1, +{r["temp_per_image_mib"]:.0f} MiB per image '
        f'(compiled in {r["compile_s"]:.1f} s)')
  return rows


def measured(batch_sizes, repeats: int, log=print) -> list[dict]:
  rows = []
  for label, config, overrides, peer, res in MEASURED:
    for row in run_inference([f'--config={config}', *overrides, f'--batch_sizes={",".join(map(str, batch_sizes))}',
                              f'--resolutions={res}', f'--repeats={repeats}', f'--reference={peer}'], log):
      rows.append(dict(label=label, **row))
  return rows


def study_runs(study_workdir: str) -> tuple[list[dict], list[str]]:
  """The study's finished finetune runs (family, model, epochs, finetuned top-1, its inference FLOPs) and notes
  on the rest. Raises ValueError when the directory holds no study runs."""
  runs, notes = [], []
  for config_path in sorted(glob.glob(os.path.join(study_workdir, '*', 'config.json'))):
    workdir = os.path.dirname(config_path)
    run = analyze.read_run(workdir)
    if isinstance(run, str):
      notes.append(run)
      continue
    top1 = analyze.read_finetune(workdir)
    if isinstance(top1, str):
      notes.append(top1)
    if not isinstance(top1, float):  # None: a run the sweep did not finetune.
      continue
    finetune = os.path.join(workdir, 'finetune')
    config = json.loads(epath.Path(finetune, 'config.json').read_text())
    shape = tuple(config['study']['input_shape'])
    runs.append(dict(family=run.family, model=run.model, epochs=run.epochs, lr=run.learning_rate, top1=100 * top1,
                     workdir=finetune, input_shape=shape, params=run.params,
                     gflops=MODULES[run.family].forward_flops(config['model'], shape) / 1e9))
  if not runs:
    raise ValueError(f'{study_workdir} holds no finished finetune runs of the study: run the main job first '
                     '(README: python -m train.sweep --config=configs/convnets_at_scale_cpu.py ...) or pass '
                     '--study_workdir')
  return runs, notes


def matched_pairs(runs: list[dict], tolerance: float) -> list[dict]:
  """For each accuracy A that both families reach, each family's cheapest model (analytic FLOPs; a model's runs
  differ only in their pretraining budget, not in inference cost) with a run of top-1 >= A - tolerance. One
  pair per distinct (NFNet model, ViT model), at the highest such A, with each model's run nearest A."""
  families = {f: [r for r in runs if r['family'] == f] for f in ('nfnet', 'vit')}
  if not all(families.values()):
    return []
  ceiling = min(max(r['top1'] for r in rs) for rs in families.values())
  pairs = {}
  for level in sorted({r['top1'] for r in runs if r['top1'] <= ceiling}):
    pick = {}
    for family, rs in families.items():
      reached = [r for r in rs if r['top1'] >= level - tolerance]
      model = min(reached, key=lambda r: (r['gflops'], r['model']))['model']
      pick[family] = min((r for r in reached if r['model'] == model),
                         key=lambda r: (abs(r['top1'] - level), r['workdir']))
    pairs[pick['nfnet']['model'], pick['vit']['model']] = dict(level=level, **pick)
  return sorted(pairs.values(), key=lambda p: p['level'])


def measure_study(pairs: list[dict], batch: int, log=print) -> dict[str, list[dict]]:
  """benchmarks.inference rows of every run in `pairs`, by finetune workdir."""
  rows = {}
  for pair in pairs:
    for family in ('nfnet', 'vit'):
      workdir = pair[family]['workdir']
      if workdir not in rows:
        rows[workdir] = run_inference([f'--workdir={workdir}', f'--batch_sizes=1,{batch}', '--repeats=20'], log)
  return rows


def main(argv):
  cli.no_arguments(argv, 'options go in flags, e.g. --measure --out=DIR')
  cli.quiet_logging()
  with cli.failing_on(ValueError, analyze.StudyError, FileNotFoundError):
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    if FLAGS.memory_batch < 2 or FLAGS.study_batch < 2 or FLAGS.repeats < 1 or min(batch_sizes) < 1:
      raise ValueError('--memory_batch and --study_batch must be at least 2, --repeats and --batch_sizes at least 1.')
    epath.Path(FLAGS.out).mkdir(parents=True, exist_ok=True)
    result = dict(memory_batch=FLAGS.memory_batch)
    print('published accuracy-matched models (abstract compile, nothing allocated):')
    result['published'] = published(FLAGS.memory_batch)
    print('resolution sweep:')
    result['sweep'] = im.resolution_sweep(FLAGS.memory_batch)
    result['study_note'] = None
    if os.path.isdir(FLAGS.study_workdir):
      print(f'the study\'s runs in {FLAGS.study_workdir}:')
      runs, notes = study_runs(FLAGS.study_workdir)
      pairs = matched_pairs(runs, FLAGS.tolerance)
      result.update(study_workdir=FLAGS.study_workdir, study_runs=runs, study_notes=notes, study_pairs=pairs,
                    study_batch=FLAGS.study_batch, tolerance=FLAGS.tolerance,
                    study_measured=measure_study(pairs, FLAGS.study_batch))
    else:
      result['study_note'] = (f'{FLAGS.study_workdir} does not exist: run the main job (README, "The two commands") '
                              'or pass --study_workdir to compare the study\'s own models.')
      print(result['study_note'])
    if FLAGS.measure:
      print('measured on this machine:')
      result['measured'] = measured(batch_sizes, FLAGS.repeats)
  report = inference_report.markdown(result)
  epath.Path(FLAGS.out, 'inference.md').write_text(report)
  epath.Path(FLAGS.out, 'inference.json').write_text(json.dumps(result, indent=1, default=str))
  with epath.Path(FLAGS.out, 'inference.png').open('wb') as f:
    inference_plot.plot(result, f)
  print(report, end='')
  print(f'wrote {FLAGS.out}/inference.md, inference.png and inference.json', file=sys.stderr)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
