"""train.sweep: the paper's grid expanded with estimates, and a miniature of the CPU study end to end."""
import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest

from train import cli
from train.study import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JFT_IMAGES, V4_CORE_PEAK = 4_000_000_000, 137.5e12


@pytest.fixture(scope='module')
def paper_grid():
  """The paper's grid planned on JFT-4B at full utilisation (what --dry_run prints, planned once)."""
  return sweep.plan(os.path.join(REPO, 'configs/convnets_at_scale.py') + ':dataset=jft4b,mfu=1.0')


def test_paper_grid_dry_run_lists_both_stages_with_steps_and_core_hours(paper_grid):
  """The finetune stage (ImageNet, configs/nfnet_i1k_ft.py) of every (model, epochs): its learning rate is
  chosen later, so one row per group, with its own steps and the pretraining budget's hardware and mfu."""
  spec = os.path.join(REPO, 'configs/convnets_at_scale.py')
  stage = sweep.finetune_stage(spec)
  estimates = sweep.finetune_estimates(paper_grid, stage, 'WORKDIR', ())
  lines = sweep.table(paper_grid, estimates, stage.select).splitlines()
  finetune = [l.split() for l in lines if l.split()[0].endswith('/finetune')]
  assert len(finetune) == 6 * 6 and finetune[0][0] == 'F0_0.25ep_lr*/finetune'
  steps = {int(r[2].replace(',', '')) for r in finetune}
  assert steps == {50 * 1_281_167 // 2048}  # 50 ImageNet epochs at batch 2048
  assert all(float(r[5]) > 0 for r in finetune)  # est. core-h
  assert lines[-2].startswith('36 finetune runs |') and 'core-hours on tpu_v4' in lines[-2]
  assert lines[-1].startswith('both stages: 180 runs |')


def test_paper_grid_expands_with_names_steps_and_core_hours(paper_grid):
  runs = paper_grid
  assert len(runs) == 6 * 6 * 4
  names = {r.name for r in runs}
  assert len(names) == len(runs) and {'F0_0.25ep_lr0.4', 'F3+_2ep_lr1.6', 'F7+_8ep_lr3.2'} <= names
  assert {r.config.study.model for r in runs} == {'F0', 'F1', 'F3', 'F3+', 'F7', 'F7+'}
  assert sorted({r.config.schedule.base_learning_rate for r in runs}) == [0.4, 0.8, 1.6, 3.2]
  by_name = {r.name: r for r in runs}
  f7p = by_name['F7+_8ep_lr1.6']
  assert f7p.steps == 8 * JFT_IMAGES // 4096 and f7p.config.total_steps == f7p.steps
  # The paper's F7+ at 8 epochs of JFT-4B: 3 x 2 x MACs per image (100.7B at 224, plus the 30k-class head's
  # 4096 x 30000) x 32B images / 137.5 TFLOP/s per TPU-v4 core: about 39k core-hours at 100% utilisation.
  macs = 100.74e9 + 4096 * 30_000
  assert f7p.core_hours() == pytest.approx(6 * macs * 8 * JFT_IMAGES / V4_CORE_PEAK / 3600, rel=5e-3)
  assert 38_500 < f7p.core_hours() < 39_500
  # Compute doubles with the epoch budget, and a bigger model costs more per example.
  assert by_name['F3_2ep_lr0.8'].core_hours() == pytest.approx(2 * by_name['F3_1ep_lr0.8'].core_hours(), rel=1e-6)
  assert by_name['F0_1ep_lr0.8'].core_hours() < by_name['F1_1ep_lr0.8'].core_hours() < by_name['F3_1ep_lr0.8'].core_hours()
  assert by_name['F7_1ep_lr0.8'].params < by_name['F7+_1ep_lr0.8'].params


def test_dry_run_prints_every_run_and_the_total():
  out = subprocess.run([sys.executable, '-m', 'train.sweep', '--config=configs/vit_at_scale.py', '--dry_run'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0].split()[:3] == ['run', 'params', 'steps']
  assert lines[1 + 3 * 6 * 2].startswith('36 runs |')  # The pretraining stage; the finetune stage follows.
  assert any(l.startswith('So400m-14_8ep_lr0.0008 ') for l in lines)
  finetune = [l for l in lines if l.split()[0].endswith('/finetune')]
  assert len(finetune) == 3 * 6 and any(l.startswith('G-14_8ep_lr*/finetune ') for l in finetune)
  assert lines[-1].startswith('both stages: 54 runs |')


def test_bad_sweep_config_is_one_line(tmp_path):
  bad = tmp_path / 'not_a_sweep.py'
  bad.write_text('def get_config(arg=None):\n  return None\n')
  out = subprocess.run([sys.executable, '-m', 'train.sweep', f'--config={bad}', '--dry_run'], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [f'error: {bad} has no get_sweep(); a sweep config defines get_config, '
                                             'get_sweep and run_name.']


# One learning rate and the pretraining stage only (the finetune stage: tests/train/study/test_two_stage.py).
MINI = os.path.join(REPO, 'configs/convnets_at_scale_cpu.py') + ':models=nf-XS+vit-XS,epochs=0.25+1,lr_factors=1'


def _sweep(spec, workdir, data_dir, *flags, env=(), preexec_fn=None):
  cmd = [sys.executable, '-m', 'train.sweep', f'--config={spec}', f'--workdir={workdir}',
         f'--set=data.data_dir={data_dir}', *flags]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', **dict(env))
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


@pytest.fixture(scope='module')
def mini_study(digits_dir, tmp_path_factory):
  """The miniature CPU study, run once by the command: two models (one per family) x two budgets."""
  workdir = tmp_path_factory.mktemp('mini') / 'study'
  out = _sweep(MINI, workdir, digits_dir, '--stage=pretrain')
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out


def test_cpu_study_miniature_end_to_end_and_resume(mini_study, digits_dir, capsys):
  """Runs, skips them when rerun, and writes the analysis."""
  workdir, out = mini_study
  names = ['nf-XS_0.25ep_lr0.8', 'nf-XS_1ep_lr0.8', 'vit-XS_0.25ep_lr0.01', 'vit-XS_1ep_lr0.01']
  for name in names:
    with open(workdir / name / 'config.json') as f:
      config = json.load(f)
    steps = -(-config['budget']['epochs'] * 1293 // 64)  # ceil(epochs x 1293 / 64) of train[:90%]: 6 and 21 steps
    assert config['total_steps'] == steps and config['study']['params'] > 0
    with open(workdir / name / 'metrics.jsonl') as f:
      records = [json.loads(line) for line in f]
    last, per_example = records[-1], records[0]['compute/flops_per_example_analytic']
    assert last['step'] == steps and last['eval/test/loss'] > 0 and last['eval/minival/loss'] > 0
    assert last['compute/train_flops'] == pytest.approx(steps * 64 * per_example)
  report = (workdir / 'study.md').read_text()
  for name in ('nf-XS', 'vit-XS'):
    assert f'| {name.split("-")[0].replace("nf", "nfnet")} | {name} |' in report
  assert '**Answer:**' in report and (workdir / 'study.png').stat().st_size > 10_000
  # One model per family: the growth rates of the compute-optimal model need more, said once each.
  for family, model in (('nfnet', 'nf-XS'), ('vit', 'vit-XS')):
    line = (f'- {family}: the compute-optimal growth rates (params_opt, epochs_opt ∝ C^x) are fitted over models '
            f'and need runs of 2 or more, it has 1 ({model}); add models.')
    assert report.count(line) == 1 and out.stdout.count(line) == 1
  assert os.listdir(workdir / 'tensorboard' / 'study')
  # Rerun: every run is found finished and skipped, nothing is trained again.
  runs = sweep.plan(MINI, [f'data.data_dir={digits_dir}'])
  assert all(sweep.finished(str(workdir / r.name)) for r in runs)
  assert sweep.train_all(runs, str(workdir))
  assert capsys.readouterr().out.count('finished earlier, skipped') == 4


def test_run_killed_before_its_final_save_is_resumed_and_one_run_is_analysed(mini_study, digits_dir, tmp_path):
  """A run with its final eval logged but no final checkpoint (killed between the two) is not finished: the
  sweep trains it again. Then the analysis of that one run says which fits need more runs and still reports."""
  root = tmp_path / 'study'
  run_dir = root / 'nf-XS_0.25ep_lr0.8'
  shutil.copytree(mini_study[0] / 'nf-XS_0.25ep_lr0.8', run_dir)
  assert sweep.finished(str(run_dir))
  shutil.rmtree(run_dir / 'checkpoints' / '6')  # The final (and only) save of the 6 steps.
  assert not sweep.finished(str(run_dir))
  out = _sweep(MINI, root, digits_dir, '--only=nf-XS_0.25ep', '--stage=pretrain')
  assert out.returncode == 0, out.stderr[-3000:]
  assert '[1/1] nf-XS_0.25ep_lr0.8: 6 steps' in out.stdout and 'skipped' not in out.stdout
  assert sweep.finished(str(run_dir)) and (run_dir / 'checkpoints' / '6').is_dir()
  report = (root / 'study.md').read_text()
  needs = report.split('## Fits that need more runs\n\n')[1].split('\n\n')[0].splitlines()
  assert needs == [
      '- nfnet: the power law through the frontier needs 2 or more frontier runs of distinct compute, it has 1; '
      'add epoch budgets or models.',
      '- nfnet: the compute-optimal growth rates (params_opt, epochs_opt ∝ C^x) are fitted over models and need '
      'runs of 2 or more, it has 1 (nf-XS); add models.',
      '- ConvNets vs ViTs: the answer needs a fitted frontier of both families (nfnet and vit); nfnet, vit have '
      'none yet; add runs.']
  assert all(line in out.stdout for line in needs)
  assert '| nfnet | nf-XS |' in report and (root / 'study.png').stat().st_size > 10_000


def test_non_finite_loss_in_a_sweep_exits_3_with_one_line(digits_dir, tmp_path):
  """Deterministic: exit 3, which the launcher's restart loop does not retry (exit 1 would be retried)."""
  out = _sweep(os.path.join(REPO, 'configs/convnets_at_scale_cpu.py') + ':models=vit-XS,epochs=0.25,lr_factors=1',
               tmp_path, digits_dir, '--set=schedule.base_learning_rate=1e30')
  assert out.returncode == 3, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and re.fullmatch(
      r'error: run vit-XS_0\.25ep_lr0\.01: train/(loss|param_norm) is (nan|inf|-inf) at step \d; stopped without saving '
      r'\(nothing was saved\)\. Lower the learning rate .*', lines[0]), lines
  assert not sweep.finished(str(tmp_path / 'vit-XS_0.25ep_lr0.01')) and not (tmp_path / 'study.md').exists()


def test_io_failure_in_a_sweep_exits_74_with_one_line(digits_dir, tmp_path):
  """A write the storage refuses during the final save: retryable, exit 74 (cli.TRANSIENT_IO_EXIT), one line
  naming the run. The storage is a file-size limit of 8 KiB (EFBIG, as a full disk gives ENOSPC): the run's
  records fit under it, its checkpoint's files do not."""
  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # Python ignores SIGXFSZ: writes raise instead.

  # No compilation cache entries written (they would fail too, with JAX's warning); those there are still read.
  out = _sweep(os.path.join(REPO, 'configs/convnets_at_scale_cpu.py') + ':models=vit-XS,epochs=0.25,lr_factors=1',
               tmp_path, digits_dir, env={'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '1e9'}, preexec_fn=limit_file_size)
  assert out.returncode == cli.TRANSIENT_IO_EXIT == 74, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: run vit-XS_0.25ep_lr0.01: ') and 'File too large' in lines[0]
  assert lines[0].endswith('rerun the same command to resume from the last checkpoint'), lines
  assert 'step 6 | eval/minival/loss' in out.stdout and not sweep.finished(str(tmp_path / 'vit-XS_0.25ep_lr0.01'))
