"""train.sweep: the paper's grid expanded with estimates, and a miniature of the CPU study end to end."""
import json
import os
import subprocess
import sys

import pytest

from train.study import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JFT_IMAGES, V4_CORE_PEAK = 4_000_000_000, 137.5e12


def test_paper_grid_expands_with_names_steps_and_core_hours():
  runs = sweep.plan(os.path.join(REPO, 'configs/convnets_at_scale.py') + ':dataset=jft4b,mfu=1.0')
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
  assert len(lines) == 1 + 3 * 6 * 2 + 1 and lines[-1].startswith('36 runs |')
  assert any(l.startswith('So400m-14_8ep_lr0.0008 ') for l in lines)


def test_bad_sweep_config_is_one_line(tmp_path):
  bad = tmp_path / 'not_a_sweep.py'
  bad.write_text('def get_config(arg=None):\n  return None\n')
  out = subprocess.run([sys.executable, '-m', 'train.sweep', f'--config={bad}', '--dry_run'], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [f'error: {bad} has no get_sweep(); a sweep config defines get_config, '
                                             'get_sweep and run_name.']


def test_cpu_study_miniature_end_to_end_and_resume(digits_dir, tmp_path, capsys):
  """Two models (one per family) x two budgets: runs, skips them when rerun, and writes the analysis."""
  workdir = tmp_path / 'study'
  spec = os.path.join(REPO, 'configs/convnets_at_scale_cpu.py') + ':models=nf-XS+vit-XS,epochs=0.25+1'
  cmd = [sys.executable, '-m', 'train.sweep', f'--config={spec}', f'--workdir={workdir}',
         f'--set=data.data_dir={digits_dir}']
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  names = ['nf-XS_0.25ep', 'nf-XS_1ep', 'vit-XS_0.25ep', 'vit-XS_1ep']
  for name in names:
    with open(workdir / name / 'config.json') as f:
      config = json.load(f)
    steps = -(-config['budget']['epochs'] * 1437 // 64)  # ceil(epochs x 1437 / 64): 6 and 23 steps
    assert config['total_steps'] == steps and config['study']['params'] > 0
    with open(workdir / name / 'metrics.jsonl') as f:
      records = [json.loads(line) for line in f]
    last, per_example = records[-1], records[0]['compute/flops_per_example_analytic']
    assert last['step'] == steps and last['eval/loss'] > 0
    assert last['compute/train_flops'] == pytest.approx(steps * 64 * per_example)
  report = (workdir / 'study.md').read_text()
  for name in ('nf-XS', 'vit-XS'):
    assert f'| {name.split("-")[0].replace("nf", "nfnet")} | {name} |' in report
  assert '**Answer:**' in report and (workdir / 'study.png').stat().st_size > 10_000
  # Rerun: every run is found finished and skipped, nothing is trained again.
  runs = sweep.plan(spec, [f'data.data_dir={digits_dir}'])
  assert all(sweep.finished(str(workdir / r.name)) for r in runs)
  assert sweep.train_all(runs, str(workdir))
  assert capsys.readouterr().out.count('finished earlier, skipped') == 4
