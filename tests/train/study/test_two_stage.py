"""train.sweep's finetune stage end to end on a miniature (digits, a one-block ViT, a few steps per run): both
stages, the best-learning-rate selection, skipping, resuming, the analysis; and the pod grid's dry run."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from train import metrics as metrics_lib
from train.study import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Pretraining: 10-class digits at 8x8, the learning rate chosen on a minival carved from training. Finetuning:
# digits at 16x16 with a new 12-class head (init_params_exclude), fixed sin-cos position embeddings, and an
# intermediate checkpoint so that an interrupted finetune has one to resume from.
MINI_SWEEP = '''
import ml_collections
from configs import common

LEARNING_RATES = (0.01, 0.03)
EPOCHS = (0.5, 2.0)
FINETUNE_SELECT = 'best_lr'


def _arg(arg):
  return common.parse_arg(arg, epochs=0.5, lr=0.01, stage='pretrain')


def get_config(arg=None):
  a = _arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = dict(num_classes=10, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=2, posemb='sincos2d',
                 pool_type='gap', dropout=0.0, dtype='float32', scan=False, remat=False)
  c.task = dict(name='classification', label_smoothing=0.0)
  pp = 'value_range(-1, 1)|keep("image", "label")'
  c.data = dict(name='digits', data_dir=common.optional(str), train_split='train[:90%]', eval_split='test',
                pp_train=pp, pp_eval=pp, num_train_examples=1293, num_threads=1, prefetch=1)
  c.evals = dict(minival=dict(split='train[90%:]'), test=dict(split='test'))
  c.batch_size = 64
  c.eval_batch_size = 120
  c.budget = dict(epochs=a.epochs, core_hours=common.optional(float), hardware='cpu', mfu=common.optional(float))
  c.total_steps = 0
  c.study = dict(family='vit', model='tiny', epochs=a.epochs, learning_rate=a.lr, input_shape=(8, 8, 1),
                 select_eval='minival', report_eval='test')
  c.log_every_steps = 3
  c.eval_every_steps = 10**9
  c.checkpoint_every_steps = 10**9
  c.checkpoints_to_keep = 2
  c.optimizer = common.adamw(weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=a.lr, warmup_fraction=0.05, decay='cosine',
                                              end_learning_rate=0.0))
  c.init_params = common.optional(str)
  c.init_params_exclude = common.optional(str)
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()
  if a.stage == 'finetune':
    del c['study']  # The analysis then reads the `test` evaluator's top-1; the sweep, pp_train's resolution.
    c.model.num_classes = 12
    c.init_params_exclude = 'head/.*'
    pp = 'resize(16)|value_range(-1, 1)|keep("image", "label")'
    c.data.update(pp_train=pp, pp_eval=pp)
    c.budget.epochs = 0.5
    c.checkpoint_every_steps = 6
    c.schedule.base_learning_rate = 0.01
  return c


def get_sweep(arg=None):
  return [f'epochs={e},lr={lr}' for e in EPOCHS for lr in LEARNING_RATES]


def run_name(run_arg):
  a = _arg(run_arg)
  return f'tiny_{a.epochs:g}ep_lr{a.lr:g}'


def finetune_config(run_arg):
  return f'{__file__}:epochs={_arg(run_arg).epochs},stage=finetune'
'''
NAMES = ['tiny_0.5ep_lr0.01', 'tiny_0.5ep_lr0.03', 'tiny_2ep_lr0.01', 'tiny_2ep_lr0.03']


def _sweep(spec, workdir, data_dir, *flags):
  cmd = [sys.executable, '-m', 'train.sweep', f'--config={spec}', f'--workdir={workdir}',
         f'--set=data.data_dir={data_dir}', *flags]
  return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'), capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope='module')
def two_stage(digits_dir, tmp_path_factory):
  """The miniature sweep, both stages, run once by the command."""
  root = tmp_path_factory.mktemp('two_stage')
  spec = root / 'mini_sweep.py'
  spec.write_text(MINI_SWEEP)
  workdir = root / 'study'
  out = _sweep(spec, workdir, digits_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  return str(spec), workdir, out


def _last(run_dir):
  return metrics_lib.read_metrics(str(run_dir))[-1]


def test_two_stages_select_the_lower_minival_loss_and_report_both_fits(two_stage):
  spec, workdir, out = two_stage
  for epochs in ('0.5', '2'):
    group = [n for n in NAMES if f'_{epochs}ep_' in n]
    minival = {n: _last(workdir / n)['eval/minival/loss'] for n in group}
    best = min(minival, key=minival.get)
    assert minival[best] < max(minival.values())  # The two learning rates differ: a real choice.
    assert (workdir / best / 'finetune' / 'config.json').exists()
    assert not any((workdir / n / 'finetune').exists() for n in group if n != best)
    with open(workdir / best / 'finetune' / 'config.json') as f:
      config = json.load(f)
    assert config['init_params'] == str(workdir / best) and config['model']['num_classes'] == 12
    last = _last(workdir / best / 'finetune')
    assert last['step'] == config['total_steps'] == 11 and 0 <= last['eval/test/accuracy'] <= 1
  report = (workdir / 'study.md').read_text()
  assert report in out.stdout
  # Every run listed, the chosen ones marked; the loss fit and the finetuned-error fit both made (2 points each).
  rows = [line for line in report.split('## Runs')[1].split('\n## ')[0].splitlines() if line.startswith('| vit |')]
  assert len(rows) == 4 and sum('✓' in r for r in rows) == 2
  fits = report.split('## Finetuned top-1 against pretraining compute')[1]
  assert '| vit | 2 | ' in report.split('## Power laws')[1].split('##')[0] and '| vit | 2 | ' in fits
  assert ('- vit: the power law of the finetuned top-1 error has no 95% intervals: its 2 frontier runs fit it '
          'exactly') in report
  assert '## Compute: estimated and measured' in report and '%' in report.split('| vit | 4 |')[1].splitlines()[0]
  assert (workdir / 'study.png').stat().st_size > 10_000


def test_rerun_skips_what_is_finished_and_an_interrupted_finetune_resumes(two_stage, digits_dir, tmp_path):
  spec, workdir, _ = two_stage
  root = tmp_path / 'study'
  shutil.copytree(workdir, root, ignore=shutil.ignore_patterns('compilation_cache'))
  # A finetune stopped after its step-6 checkpoint: its final checkpoint gone, the run is unfinished and resumes;
  # everything else, both stages, is skipped.
  chosen = [n for n in NAMES if (root / n / 'finetune').exists()][0]
  finetune = root / chosen / 'finetune'
  shutil.rmtree(finetune / 'checkpoints' / '11')
  assert not sweep.finished(str(finetune)) and (finetune / 'checkpoints' / '6').is_dir()
  out = _sweep(spec, root, digits_dir, '--analyze=false')
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'{chosen}/finetune: 11 steps' in out.stdout and out.stdout.count('finished earlier, skipped') == 5
  assert f'resumed from {finetune / "checkpoints"} at step 6' in out.stdout
  assert sweep.finished(str(finetune))
  steps = [r['step'] for r in metrics_lib.read_metrics(str(finetune)) if 'train/loss' in r]
  assert steps[-1] == 11 and 6 in steps


def test_finetune_stage_without_its_pretraining_run_is_one_error_line(two_stage, digits_dir, tmp_path):
  spec, workdir, _ = two_stage
  shutil.copytree(workdir / NAMES[0], tmp_path / NAMES[0])  # One of the four pretraining runs.
  out = _sweep(spec, tmp_path, digits_dir, '--stage=finetune')
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines() == [
      f'error: the finetune stage needs pretraining run {NAMES[1]}, which is missing ({tmp_path / NAMES[1]}); run '
      'the pretraining stage first: the same command with --stage=pretrain (or --stage=all)']


def test_dry_run_lists_both_stages_of_the_mini_sweep(two_stage):
  spec, _, _ = two_stage
  runs = sweep.plan(spec)  # What --dry_run prints (the command itself: the pod grids in test_sweep.py).
  stage = sweep.finetune_stage(spec)
  lines = sweep.table(runs, sweep.finetune_estimates(runs, stage, 'WORKDIR', ()), stage.select).splitlines()
  rows = {l.split()[0]: l.split() for l in lines if l.startswith('tiny_')}
  assert list(rows) == [*NAMES, 'tiny_0.5ep_lr*/finetune', 'tiny_2ep_lr*/finetune']
  # ceil(0.5 x 1293 / 64) = 11 steps; the finetune's FLOPs at 16x16 pixels: 4x the tokens of 8x8.
  assert rows['tiny_0.5ep_lr*/finetune'][2] == '11' and rows[NAMES[0]][2] == '11' and rows[NAMES[2]][2] == '41'
  assert float(rows['tiny_0.5ep_lr*/finetune'][3]) > 3.5 * float(rows[NAMES[0]][3])
  assert lines[-1].startswith('both stages: 6 runs |')
