"""Scaling analysis: power-law fits and their CIs, frontiers, compute-optimal allocation, the analyze CLI."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from train.study import analyze, scaling

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_fit_is_exact_without_noise():
  c = np.geomspace(1e15, 1e21, 9)
  fit = scaling.fit_power_law(c, 40.0 * c ** -0.07)
  np.testing.assert_allclose([fit.a, fit.b, fit.E, fit.r2], [40.0, -0.07, 0.0, 1.0], rtol=1e-9, atol=1e-12)
  assert fit.n == 9 and fit.b_ci[0] <= -0.07 <= fit.b_ci[1] and fit.b_ci[1] - fit.b_ci[0] < 1e-9
  np.testing.assert_allclose(fit.predict([1e18]), [40.0 * 1e18 ** -0.07], rtol=1e-9)


def test_fit_recovers_a_and_b_within_their_intervals():
  rng = np.random.default_rng(0)
  c = np.geomspace(1e2, 1e6, 10)
  fit = scaling.fit_power_law(c, 3.0 * c ** -0.1 * np.exp(rng.normal(0, 0.02, c.size)))
  assert fit.a_ci[0] < 3.0 < fit.a_ci[1] and fit.b_ci[0] < -0.1 < fit.b_ci[1]
  assert abs(fit.b + 0.1) < 0.01
  # The 90% intervals of many noisy repetitions cover the true slope about 90% of the time, and the slope's
  # half-width is the textbook t * s / sqrt(Sxx) on log values.
  x = np.log(c)
  covered = 0
  for _ in range(400):
    y = np.log(3.0) - 0.1 * x + rng.normal(0, 0.05, c.size)
    fit = scaling.fit_power_law(c, np.exp(y), confidence=0.9)
    covered += fit.b_ci[0] < -0.1 < fit.b_ci[1]
  slope, intercept = np.polyfit(x, y, 1)
  s = np.sqrt(((y - slope * x - intercept) ** 2).sum() / (c.size - 2))
  np.testing.assert_allclose((fit.b_ci[1] - fit.b_ci[0]) / 2,
                             1.8595480375 * s / np.sqrt(((x - x.mean()) ** 2).sum()), rtol=1e-6)  # t(0.95, 8)
  assert 0.85 < covered / 400 < 0.95


def test_fit_with_irreducible_term_recovers_E():
  c = np.geomspace(1e2, 1e8, 12)
  exact = scaling.fit_power_law(c, 1.5 + 20.0 * c ** -0.3, irreducible=True)
  np.testing.assert_allclose([exact.E, exact.a, exact.b], [1.5, 20.0, -0.3], rtol=1e-6)
  noisy = scaling.fit_power_law(c, (1.5 + 20.0 * c ** -0.3) * np.exp(np.random.default_rng(1).normal(0, 0.01, 12)),
                                irreducible=True)
  assert noisy.E_ci[0] < 1.5 < noisy.E_ci[1] and noisy.b_ci[0] < -0.3 < noisy.b_ci[1]
  assert noisy.a_ci[0] < 20.0 < noisy.a_ci[1]
  # No floor in the data: E stays at its bound 0.
  assert scaling.fit_power_law(c, 5.0 * c ** -0.2, irreducible=True).E < 1e-6


@pytest.mark.parametrize('compute, loss, kwargs, message', [
    ([1.0], [2.0], {}, 'at least 2 points'),
    ([1.0, 2.0], [2.0, 1.0], {'irreducible': True}, 'at least 3 points'),
    ([1.0, 2.0, 0.0], [2.0, 1.0, 1.0], {}, 'positive'),
    ([1.0, 2.0, 3.0], [2.0, -1.0, 1.0], {}, 'positive'),
    ([2.0, 2.0, 2.0], [2.0, 1.5, 1.0], {}, 'distinct compute'),
    ([1e10, np.nextafter(1e10, 2e10)], [2.0, 1.0], {}, 'distinct compute'),  # One point in log space.
])
def test_fit_rejects_bad_input(compute, loss, kwargs, message):
  with pytest.raises(ValueError, match=message):
    scaling.fit_power_law(compute, loss, **kwargs)


def test_two_points_fit_exactly_without_intervals():
  fit = scaling.fit_power_law([10.0, 1000.0], [2.0, 1.0])
  np.testing.assert_allclose(fit.b, np.log(0.5) / np.log(100.0))
  assert fit.a_ci is None and fit.b_ci is None


def test_frontier():
  points = [(3.0, 2.6, 'dominated by b'), (1.0, 3.0, 'same compute as b, worse'), (4.0, 2.0, 'e'),
            (1.0, 2.5, 'b'), (2.0, 2.5, 'c: ties b'), (5.0, 2.2, 'dominated by e'), (4.0, 2.0, 'e twin'),
            (0.5, 4.0, 'h'), (6.0, 1.9, 'i')]
  assert [p[2] for p in scaling.frontier(points)] == ['h', 'b', 'c: ties b', 'e', 'e twin', 'i']
  assert scaling.frontier([]) == []


def _law(params, epochs, scale=1.0):
  """A known L(N, D) with D proportional to epochs: optimal N grows as C^(0.28 / 0.62)."""
  return scale * (1.0 + 400.0 * params ** -0.34 + 2.0 * epochs ** -0.28)


def _flops(params, epochs):
  return 6.0 * params * epochs * 1e6


def test_compute_optimal_recovers_the_exponents():
  runs = [scaling.Run('nfnet', f'M{i}', n, float(e), 0.1, _flops(n, e), _law(n, e))
          for i, n in enumerate(np.round(1e6 * 2.0 ** np.arange(0, 10.01, 0.5)).astype(int))
          for e in 2.0 ** np.arange(-3, 7.01, 0.5)]
  # A worse learning rate at one budget must not change anything.
  runs.append(scaling.Run('nfnet', 'M8', runs[8 * 21].params, runs[8 * 21].epochs, 1.0, runs[8 * 21].compute, 9.0))
  opt = scaling.compute_optimal(runs, levels=np.geomspace(1e14, 1e17, 31))
  assert len(opt.allocations) == 31
  np.testing.assert_allclose(opt.alpha, 0.28 / 0.62, atol=0.02)
  np.testing.assert_allclose(opt.beta, 0.34 / 0.62, atol=0.02)
  np.testing.assert_allclose(opt.alpha + opt.beta, 1.0, atol=1e-9)  # C = 6 N D at every level.
  assert opt.params_fit.b_ci[0] < 0.28 / 0.62 < opt.params_fit.b_ci[1]
  for a in opt.allocations:  # The winner's epochs are the level over its compute per epoch.
    np.testing.assert_allclose(a.compute, _flops(a.params, a.epochs), rtol=1e-9)


def test_compute_optimal_picks_the_lowest_interpolated_model():
  runs = [scaling.Run('vit', 'S', 10, 1.0, 0.1, 100.0, 3.0), scaling.Run('vit', 'S', 10, 4.0, 0.1, 400.0, 2.0),
          scaling.Run('vit', 'B', 40, 1.0, 0.1, 400.0, 2.5), scaling.Run('vit', 'B', 40, 4.0, 0.1, 1600.0, 1.5)]
  opt = scaling.compute_optimal(runs, levels=[100.0, 200.0, 400.0, 800.0, 3200.0])
  # At 200 only S is defined: log-log halfway between (100, 3) and (400, 2) is sqrt(6). At 400 S (2.0) beats
  # B (2.5); at 800 only B, halfway: sqrt(2.5 * 1.5); 3200 is past every model.
  assert [(a.model, a.compute) for a in opt.allocations] == [('S', 100.0), ('S', 200.0), ('S', 400.0), ('B', 800.0)]
  np.testing.assert_allclose([a.loss for a in opt.allocations], [3.0, 6 ** 0.5, 2.0, 3.75 ** 0.5])
  np.testing.assert_allclose([a.epochs for a in opt.allocations], [1.0, 2.0, 4.0, 2.0])
  assert opt.params_fit.b_ci is not None  # 4 levels: intervals.
  with pytest.raises(ValueError, match='one family'):
    scaling.compute_optimal(runs + [scaling.Run('nfnet', 'F0', 1, 1.0, 0.1, 1.0, 1.0)])


def test_one_run_has_one_compute_level_and_no_growth_rates():
  run = scaling.Run('nfnet', 'F0', 10, 1.0, 0.1, 3e10, 2.0)
  np.testing.assert_array_equal(scaling.compute_levels([run]), [3e10])
  opt = scaling.compute_optimal([run])
  assert [a.model for a in opt.allocations] == ['F0'] and opt.params_fit is None


def test_compute_levels_are_the_shared_budgets_else_log_spaced():
  shared = [scaling.Run('vit', m, 1, 1.0, 0.1, c, 1.0) for m, cs in (('S', (1.0, 2.0, 4.0)), ('B', (2.0, 4.0, 8.0)))
            for c in cs]
  np.testing.assert_allclose(scaling.compute_levels(shared), [2.0, 4.0])
  apart = [scaling.Run('vit', m, 1, 1.0, 0.1, c, 1.0) for m, c in (('S', 1.0), ('S', 3.0), ('B', 10.0))]
  np.testing.assert_allclose(scaling.compute_levels(apart, num=3), [1.0, 10 ** 0.5, 10.0])


def test_compare_says_which_family_is_better():
  c = np.geomspace(1e18, 1e21, 6)
  convnet, vit = (scaling.fit_power_law(c, k * c ** -0.05) for k in (9.0, 10.0))
  result = scaling.compare(convnet, vit, (1e18, 1e21), (1e19, 1e22))
  np.testing.assert_allclose([result.compute, result.ratio, *result.ratio_range], [1e20, 0.9, 0.9, 0.9])
  assert result.overlap == (1e19, 1e21) and result.verdict == 'convnet better'
  assert scaling.compare(convnet, vit, (1e18, 1e19), (1e20, 1e21)) is None


def _write_run(root, family, model, params, epochs, lr, loss, total_steps=200, last_step=200, with_eval=True):
  workdir = os.path.join(root, f'{family}_{model}_{epochs:g}ep')
  os.makedirs(workdir)
  config = {'total_steps': total_steps, 'study': {'family': family, 'model': model, 'params': params,
                                                  'epochs': epochs, 'learning_rate': lr},
            'budget': {'core_hours': None, 'hardware': 'tpu_v4', 'mfu': 0.4, 'epochs': epochs}}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in range(100, last_step + 1, 100):
      record = {'step': step, 'train/loss': loss + 0.1, 'compute/train_flops': _flops(params, epochs) * step / 200,
                'compute/core_hours': step / 100}
      if with_eval:
        record['eval/loss'] = loss + (200 - step) / 100
      f.write(json.dumps(record) + '\n')
  return workdir


MODELS = {'nfnet': {'F0': 2e6, 'F1': 8e6, 'F3': 32e6}, 'vit': {'S': 2e6, 'B': 8e6, 'L': 32e6}}
EPOCHS = (1.0, 4.0, 16.0)


def test_cli_end_to_end(tmp_path):
  root = str(tmp_path / 'study')
  expected = {}
  for family, models in MODELS.items():
    for model, params in models.items():
      for epochs in EPOCHS:
        # ViTs: 2% above the ConvNets' law, so the fitted ratio is 1 / 1.02 at every compute.
        loss = _law(params, epochs, 1.0 if family == 'nfnet' else 1.02)
        _write_run(root, family, model, int(params), epochs, 0.1, loss)
        expected[(family, model, epochs)] = (_flops(params, epochs), loss)
  _write_run(root, 'vit', 'H', int(128e6), 1.0, 0.1, 2.0, last_step=100)  # Unfinished: left out.
  out = str(tmp_path / 'report')
  proc = subprocess.run([sys.executable, '-m', 'train.analyze', f'--workdirs={root}/*', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(out, 'study.md')) as f:
    report = f.read()
  assert proc.stdout == report

  rows = {}
  for line in report.split('## Runs')[1].split('\n## ')[0].splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 11 and cells[0] in MODELS:
      rows[(cells[0], cells[1], float(cells[3]))] = (float(cells[5]), float(cells[7]), cells[9] == '*')
  assert rows.keys() == expected.keys()
  for family in MODELS:  # The frontier by brute force: nothing of the family at <= compute with lower loss.
    members = {k: v for k, v in expected.items() if k[0] == family}
    for key, (compute, loss) in members.items():
      on_frontier = not any(c <= compute and l < loss for c, l in members.values())
      np.testing.assert_allclose(rows[key][:2], (compute, loss), rtol=1e-3)
      assert rows[key][2] == on_frontier, key
  assert 'incomplete, left out' in report and 'vit_H_1ep (at step 100/200' in report
  answer = next(l for l in report.splitlines() if l.startswith('**Answer:**'))
  assert f'{1 / 1.02:.4f}x the best ViT' in answer and f'{(1 / 1.02 - 1) * 100:+.2f}%' in answer
  assert 'params_opt ∝ C^' in report and '| nfnet | F0 |' in report

  with Image.open(os.path.join(out, 'study.png')) as image:
    assert image.format == 'PNG' and image.size == (1000, 700)
    colours = np.unique(np.asarray(image.convert('RGB')).reshape(-1, 3), axis=0)
  assert len(colours) > 50  # Curves were drawn, not a blank canvas.


def _tensorboard(root):
  """{(TensorBoard run, tag): [(step, value), ...]} and {tag: text} of the event files under root."""
  scalars, texts = {}, {}
  for run in sorted(os.listdir(root)):
    events = event_accumulator.EventAccumulator(os.path.join(root, run), size_guidance={'scalars': 0, 'tensors': 0})
    events.Reload()
    for tag in events.Tags()['scalars']:
      scalars[(run, tag)] = [(e.step, e.value) for e in events.Scalars(tag)]
    for tag in events.Tags()['tensors']:
      texts[tag] = events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
  return scalars, texts


def test_study_figure_in_tensorboard_holds_the_reports_numbers(tmp_path):
  root = str(tmp_path / 'study')
  for family, models in MODELS.items():
    for model, params in models.items():
      for epochs in EPOCHS:
        _write_run(root, family, model, int(params), epochs, 0.1, _law(params, epochs))
  # A worse learning rate at one budget: the report lists it, the per-model curve keeps the better one.
  worse = _write_run(str(tmp_path / 'lr'), 'vit', 'S', int(2e6), 4.0, 0.3, _law(2e6, 4.0) + 0.5)
  os.rename(worse, os.path.join(root, 'vit_S_4ep_lr0.3'))
  out = str(tmp_path / 'report')
  report = analyze.write_report([f'{root}/*'], out)
  rows = {}
  for line in report.split('## Runs')[1].split('\n## ')[0].splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 11 and cells[0] in MODELS:
      rows.setdefault((cells[0], cells[1], float(cells[3])), []).append((float(cells[5]), float(cells[7]),
                                                                         cells[9] == '*'))
  assert len(rows[('vit', 'S', 4.0)]) == 2 and sum(map(len, rows.values())) == 19

  for rerun in (False, True):  # A second analysis replaces the figure rather than adding to it.
    if rerun:
      analyze.write_report([f'{root}/*'], out)
    scalars, texts = _tensorboard(os.path.join(out, 'tensorboard', 'study'))
    for family, models in MODELS.items():
      tag = f'study/{family}/eval_loss_vs_log10_train_flops'
      for model in models:
        best = sorted(min(rows[(family, model, e)], key=lambda r: r[1]) for e in EPOCHS)
        points = scalars[(model, tag)]
        assert [step for step, _ in points] == [round(1000 * np.log10(_flops(models[model], e))) for e in EPOCHS]
        np.testing.assert_allclose([v for _, v in points], [r[1] for r in best], atol=5e-5)  # 4 decimals
        np.testing.assert_allclose([10 ** (step / 1000) for step, _ in points], [r[0] for r in best], rtol=2e-3)
      front = sorted(r for (f, _, _), rs in rows.items() if f == family for r in rs if r[2])
      points = scalars[('frontier', tag)]
      np.testing.assert_allclose([v for _, v in points], [r[1] for r in front], atol=5e-5)
      fit = scalars[('power-law_fit', tag)]
      assert len(fit) == 17 and fit[0][0] == points[0][0] and fit[-1][0] == points[-1][0]
    assert len(scalars) == 6 + 2 * 2 and texts['study/report/text_summary'] == report


def _needs(report):
  return report.split('## Fits that need more runs\n\n')[1].splitlines()


def test_one_run_and_one_model_say_which_fits_need_more_runs(tmp_path):
  """The analysis of a sweep run with --only=ONE_RUN, or of one model's budgets, makes the fits it can, says
  which need more runs, and writes the report and the figure."""
  _write_run(str(tmp_path / 'one'), 'vit', 'S', 1000, 1.0, 0.1, 2.0)
  for epochs in EPOCHS:
    _write_run(str(tmp_path / 'model'), 'nfnet', 'F0', 1000, epochs, 0.1, _law(1000, epochs))
  reports = {}
  for runs in ('one', 'model'):
    out = tmp_path / f'out_{runs}'
    reports[runs] = analyze.write_report([str(tmp_path / runs / '*')], str(out))
    assert (out / 'study.md').read_text() == reports[runs] and (out / 'study.png').stat().st_size > 10_000
  growth = ('the compute-optimal growth rates (params_opt, epochs_opt ∝ C^x) are fitted over models and need runs '
            'of 2 or more, it has 1 ({}); add models.')
  assert _needs(reports['one']) == [
      '- vit: the power law through the frontier needs 2 or more frontier runs of distinct compute, it has 1; add '
      'epoch budgets or models.',
      '- vit: ' + growth.format('S'),
      '- ConvNets vs ViTs: the answer needs a fitted frontier of both families (nfnet and vit); nfnet, vit have '
      'none yet; add runs.']
  assert _needs(reports['model']) == [
      '- nfnet: ' + growth.format('F0'),
      '- ConvNets vs ViTs: the answer needs a fitted frontier of both families (nfnet and vit); vit has none yet; '
      'add runs.']
  assert '| nfnet | 3 | ' in reports['model']  # The power law through 3 frontier runs, with intervals.
  # Two budgets: the power law is exact, without intervals, and the report says what would give them.
  shutil.rmtree(tmp_path / 'model' / 'nfnet_F0_16ep')
  report = analyze.write_report([str(tmp_path / 'model' / '*')], str(tmp_path / 'out_two'))
  assert ('- nfnet: the power law through the frontier has no 95% intervals: its 2 frontier runs fit it exactly, 3 '
          'or more give intervals; add epoch budgets or models.') in _needs(report)


def test_budget_core_hours_and_measured_core_hours(tmp_path):
  workdir = _write_run(str(tmp_path), 'nfnet', 'F0', 1000, 2.0, 0.1, 2.0)
  run = analyze.read_run(workdir, 'budget_core_hours', analyze.parse_peak_flops([]))
  np.testing.assert_allclose(run.compute, _flops(1000, 2.0) / (137.5e12 * 0.4) / 3600)
  run = analyze.read_run(workdir, 'budget_core_hours', analyze.parse_peak_flops(['TPU_v4=100e12']))
  np.testing.assert_allclose(run.compute, _flops(1000, 2.0) / (100e12 * 0.4) / 3600)
  assert analyze.read_run(workdir, 'core_hours').compute == 2.0
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['budget']['peak_flops'] = 50e12  # The run's own peak wins over the table.
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  run = analyze.read_run(workdir, 'budget_core_hours', analyze.parse_peak_flops(['tpu_v4=100e12']))
  np.testing.assert_allclose(run.compute, _flops(1000, 2.0) / (50e12 * 0.4) / 3600)
  label = analyze.compute_label('budget_core_hours', [workdir])
  assert label == 'training compute (TPU-v4 core hours, estimated from FLOPs)'


def test_unfinished_runs_are_notes(tmp_path):
  no_eval = _write_run(str(tmp_path), 'nfnet', 'F0', 1000, 2.0, 0.1, 2.0, with_eval=False)
  assert 'no eval/loss at its last logged step' in analyze.read_run(no_eval)
  short = _write_run(str(tmp_path), 'nfnet', 'F1', 1000, 2.0, 0.1, 2.0, last_step=100)
  assert 'at step 100/200' in analyze.read_run(short)
  with pytest.raises(analyze.StudyError, match='none of the 2 matched runs has finished'):
    analyze.load_runs([str(tmp_path / '*')])


def test_errors(tmp_path):
  with pytest.raises(analyze.StudyError, match='no workdirs matched'):
    analyze.find_workdirs([str(tmp_path / 'nothing*')])
  workdir = _write_run(str(tmp_path), 'nfnet', 'F0', 1000, 2.0, 0.1, 2.0)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  with pytest.raises(analyze.StudyError, match='has no metrics.jsonl'):
    analyze.read_run(workdir)
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(analyze.StudyError, match='has no config.json'):
    analyze.read_run(workdir)
  workdir = _write_run(str(tmp_path), 'vit', 'S', 1000, 2.0, 0.1, 2.0)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'total_steps': 200}, f)
  with pytest.raises(analyze.StudyError, match='has no `study` block'):
    analyze.read_run(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'total_steps': 200, 'study': {'family': 'vit', 'model': 'S'}}, f)
  with pytest.raises(analyze.StudyError, match=r"lacks \['params', 'epochs', 'learning_rate'\]"):
    analyze.read_run(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'total_steps': 200, 'study': {'family': 'vit', 'model': 'S', 'params': 1, 'epochs': 1.0,
                                             'learning_rate': 0.1}, 'budget': {'hardware': 'abacus', 'mfu': 0.5}}, f)
  with pytest.raises(analyze.StudyError, match='--peak_flops=abacus='):
    analyze.read_run(workdir, 'budget_core_hours')
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'total_steps': 200, 'study': {'family': 'vit', 'model': 'S', 'params': 1, 'epochs': 1.0,
                                             'learning_rate': 0.1}, 'budget': {'hardware': None}}, f)
  with pytest.raises(analyze.StudyError, match='no budget.hardware .* use --compute=flops'):
    analyze.read_run(workdir, 'budget_core_hours')
  with pytest.raises(analyze.StudyError, match='not hardware=FLOP/s'):
    analyze.parse_peak_flops(['tpu-v4'])


def test_cli_error_is_one_line_with_exit_status_2(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'train.analyze', f'--workdirs={tmp_path}/none*', f'--out={tmp_path}'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.startswith('error: no workdirs matched') and out.stderr.count('\n') == 1


def _write_finetune(pretrain_dir, top1, key='eval/test/accuracy', study=None, last_step=50):
  finetune = os.path.join(pretrain_dir, 'finetune')
  os.makedirs(finetune)
  with open(os.path.join(finetune, 'config.json'), 'w') as f:
    json.dump({'total_steps': 50, **({'study': study} if study else {})}, f)
  with open(os.path.join(finetune, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': last_step, 'eval/test/loss': 1.0, key: top1, 'eval/accuracy': 0.01}) + '\n')


def test_finetuned_top1_fit_answer_utilisation_and_tensorboard(tmp_path):
  """Finetuned top-1 error exactly 3 x C^-0.1 (NFNets) and 1.05 x that (ViTs): the fits recover it, the answer
  quotes the top-1 of each law at the overlap's geometric mean; the utilisation table is the logged numbers'."""
  root = str(tmp_path / 'study')
  mfus = {'nfnet': 0.5, 'vit': 0.25}
  for family, models in MODELS.items():
    for model, params in models.items():
      for epochs in EPOCHS:
        workdir = _write_run(root, family, model, int(params), epochs, 0.1, _law(params, epochs))
        with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:  # The loop's final compute/mfu.
          f.write(json.dumps({'step': 200, 'eval/loss': _law(params, epochs), 'compute/mfu': mfus[family],
                              'compute/train_flops': _flops(params, epochs), 'compute/core_hours': 2.0}) + '\n')
        if model != 'L' or epochs != 16.0:  # One finetune still running: a note, and left out of the fit.
          error = (1.0 if family == 'nfnet' else 1.05) * 3 * _flops(params, epochs) ** -0.1
          _write_finetune(workdir, 1 - error)
        else:
          _write_finetune(workdir, 0.5, last_step=20)
  report = analyze.write_report([f'{root}/*'], str(tmp_path / 'out'))
  section = report.split('## Finetuned top-1 against pretraining compute')[1].split('\n## ')[0]
  assert 'finetune incomplete, left out: ' in report and 'vit_L_16ep/finetune (at step 20/50)' in report
  # The law by itself, not the code: error(C) = 3 C^-0.1, fitted through 9 (nfnet) and 8 (vit) exact points.
  assert '| nfnet | 9 | 3 [3, 3] | -0.1 [-0.1, -0.1] |' in section
  nfnet_c = [_flops(p, e) for p in MODELS['nfnet'].values() for e in EPOCHS]
  vit_c = [_flops(p, e) for p in MODELS['vit'].values() for e in EPOCHS if (p, e) != (32e6, 16.0)]
  at = np.sqrt(max(min(nfnet_c), min(vit_c)) * min(max(nfnet_c), max(vit_c)))
  nfnet_top1, vit_top1 = 100 * (1 - 3 * at ** -0.1), 100 * (1 - 1.05 * 3 * at ** -0.1)
  answer = next(l for l in section.splitlines() if l.startswith('**Answer (finetuned):**'))
  assert f'C = {at:.4g}' in answer and f'NFNet top-1 {nfnet_top1:.2f}% vs ViT {vit_top1:.2f}%' in answer
  assert f"error is {1 / 1.05:.3f}x the ViT's" in answer and answer.endswith('outside the fits\' intervals.')
  rows = {l.split('|')[1].strip(): l for l in report.split('## Compute: estimated and measured')[1].splitlines()
          if l.startswith('| nfnet | 9 |') or l.startswith('| vit | 9 |')}
  for family, mfu in mfus.items():
    flops = sum(_flops(p, e) for p in MODELS[family].values() for e in EPOCHS)
    estimate = flops / (137.5e12 * 0.4) / 3600  # The budget's tpu_v4 at mfu 0.4.
    cells = [c.strip() for c in rows[family].strip('|').split('|')]
    assert cells[2:] == [f'{flops:.4g}', f'{estimate:.4g}', f'{9 * 2.0:.4g}', f'{mfu:.3%}',
                         f'{18.0 / flops:.4g}'], cells
  scalars, _ = _tensorboard(os.path.join(tmp_path, 'out', 'tensorboard', 'study'))
  points = scalars[('frontier', 'study/nfnet/finetune_top1_error_vs_log10_train_flops')]
  # Models of 4x the parameters at 1/4 of the epochs share a compute, so one point per distinct compute.
  np.testing.assert_allclose([v for _, v in points], [3 * c ** -0.1 for c in sorted(set(nfnet_c))], rtol=1e-6)
  with Image.open(os.path.join(tmp_path, 'out', 'study.png')) as image:
    assert image.size == (2000, 700)  # Two panels: the loss, and the finetuned top-1 error.


def test_finetune_top1_comes_from_the_report_evaluator(tmp_path):
  for name, study, key in (('named', {'report_eval': 'real'}, 'eval/real/accuracy'), ('test', None,
                                                                                       'eval/test/accuracy')):
    workdir = _write_run(str(tmp_path / name), 'vit', 'S', 1000, 1.0, 0.1, 2.0)
    _write_finetune(workdir, 0.75, key, study)
    assert analyze.read_finetune(workdir) == 0.75
  workdir = _write_run(str(tmp_path / 'plain'), 'vit', 'S', 1000, 1.0, 0.1, 2.0)
  assert analyze.read_finetune(workdir) is None  # Not finetuned.
  _write_finetune(workdir, 0.75, 'eval/other/accuracy')
  assert analyze.read_finetune(workdir) == 0.01  # No `test` evaluator: eval/accuracy.


def test_learning_rate_is_chosen_on_the_selection_loss(tmp_path):
  """select_eval chooses the run (and so the frontier); report_eval is what the table and fits report."""
  root = tmp_path / 'lr'
  for lr, minival, test in ((0.1, 2.0, 1.5), (0.2, 1.8, 1.9)):
    workdir = _write_run(str(root / str(lr)), 'vit', 'S', 1000, 1.0, lr, test)
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    config['study'].update(select_eval='minival', report_eval='test')
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config, f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': 200, 'eval/minival/loss': minival, 'eval/test/loss': test}) + '\n')
  runs, _ = analyze.load_runs([str(root / '*' / '*')])
  assert [(r.learning_rate, r.selection, r.loss) for r in scaling.best_per_budget(runs)] == [(0.2, 1.8, 1.9)]
  study = scaling.analyze(runs)
  assert [r.learning_rate for r in study.frontiers['vit']] == [0.2]  # Not the lower test loss of lr 0.1.
