"""The report of a compute-budget study: study.md's Markdown and study.png's two panels, from a `scaling.Study`.

`python -m train.analyze` (and the sweep's report) builds the Study with train/study/scaling.py and writes what
this module renders: every run, the per-family fits, the compute-optimal allocation, the finetuned top-1 against
pretraining compute, measured compute and utilisation, the ConvNet-ViT answer in both terms, and the scope.
"""
from collections.abc import Sequence

import numpy as np

from train.study.scaling import CONVNET, VIT, PowerLawFit, Study, best_per_budget


def _count(n: float) -> str:
  for unit, size in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= size:
      return f'{n / size:.3g}{unit}'
  return f'{n:.3g}'


def _ci(value: float, ci, fmt: str = '.4g') -> str:
  return f'{value:{fmt}}' + (f' [{ci[0]:{fmt}}, {ci[1]:{fmt}}]' if ci else '')


def _fit_table(fits: dict, frontiers: dict) -> list[str]:
  lines = ['| family | frontier runs | a | b | E | r² (log) |', '|---|---:|---|---|---|---:|']
  for family, fit in fits.items():
    if isinstance(fit, str):
      lines.append(f'| {family} | {len(frontiers[family])} | {fit} | | | |')
      continue
    e = _ci(fit.E, fit.E_ci) if fit.irreducible else '-'
    lines.append(f'| {family} | {fit.n} | {_ci(fit.a, fit.a_ci)} | {_ci(fit.b, fit.b_ci)} | {e} | {fit.r2:.4f} |')
  return lines


def _number(value: float | None, fmt: str = '.4g') -> str:
  return '-' if value is None else f'{value:{fmt}}'


def markdown(study: Study, compute_label: str, notes: Sequence[str] = (),
             loss_label: str = 'final held-out `eval/loss`', scope: str | None = None) -> str:
  """The report: every run, the per-family fits, the compute-optimal allocation, the finetuned top-1 against
  pretraining compute, the measured compute and utilisation, and the ConvNet-ViT answer in both terms; `scope`
  (the sweep config's STUDY_SCOPE), what runs of this size can and cannot show, closes it."""
  pct = f'{study.confidence:.0%}'
  lines = ['# Compute-budget study', '',
           f'{len(study.runs)} finished pretraining runs; compute: {compute_label}; loss: {loss_label}. Chosen: '
           'the learning rate of lowest selection loss per (model, epochs); the frontier and fits use the chosen '
           'runs only. Frontier: no other chosen run of the family has compute <= and a lower loss.', '']
  if notes:
    lines += [f'- {n}' for n in notes] + ['']
  lines += ['## Runs', '',
            '| family | model | params | epochs | lr | compute | select loss | loss | chosen | frontier | ft top-1 |',
            '|---|---|---:|---:|---:|---:|---:|---:|:---:|:---:|---:|']
  chosen = set(map(id, best_per_budget(study.runs)))
  for r in study.runs:
    mark = '*' if study.on_frontier(r) else ''
    top1 = '-' if r.top1 is None else f'{100 * r.top1:.2f}%'
    lines.append(f'| {r.family} | {r.model} | {_count(r.params)} | {r.epochs:.4g} | {r.learning_rate:.3g} | '
                 f'{r.compute:.4g} | {r.selection:.4f} | {r.loss:.4f} | {"✓" if id(r) in chosen else ""} | {mark} | '
                 f'{top1} |')

  lines += ['', f'## Power laws through each family\'s frontier ({pct} CIs)', '']
  lines += _fit_table(study.fits, study.frontiers)

  lines += ['', '## Compute-optimal allocation', '',
            'Each model\'s loss is interpolated (log-log, between its runs) at each compute level; the lowest wins.',
            '', '| family | compute | model | params | epochs | loss |', '|---|---:|---|---:|---:|---:|']
  for family, opt in study.optimal.items():
    for a in opt.allocations:
      lines.append(f'| {family} | {a.compute:.4g} | {a.model} | {_count(a.params)} | {a.epochs:.4g} | {a.loss:.4f} |')
  lines.append('')
  for family, opt in study.optimal.items():
    if opt.params_fit is None:
      lines.append(f'- {family}: no growth rates (see the fits that need more runs).')
      continue
    ci = opt.params_fit.b_ci is not None
    lines.append(f'- {family}: params_opt ∝ C^{_ci(opt.alpha, opt.params_fit.b_ci, ".3f")}, '
                 f'epochs_opt ∝ C^{_ci(opt.beta, opt.epochs_fit.b_ci, ".3f")} '
                 f'({len(opt.allocations)} levels{f", {pct} CIs" if ci else ", too few levels for CIs"}).')

  if CONVNET in study.fits and VIT in study.fits:
    lines += ['', '## ConvNets vs ViTs at equal compute', '', _answer(study)]
  lines += ['', '## Finetuned top-1 against pretraining compute', '']
  finetuned = study.finetuned
  if not finetuned:
    lines.append('No pretraining run has a finished finetune run (RUN/finetune: a sweep config\'s finetune stage).')
  else:
    lines += [f'{len(finetuned)} pretraining runs with a finished finetune run; top-1 of each finetune run\'s report '
              'evaluator; the power laws fit the top-1 error (1 - top-1) through each family\'s frontier of '
              f'finetuned runs against pretraining compute ({pct} CIs).', '',
              '| family | model | epochs | lr | pretraining compute | finetuned top-1 | frontier |',
              '|---|---|---:|---:|---:|---:|:---:|']
    for r in finetuned:
      lines.append(f'| {r.family} | {r.model} | {r.epochs:.4g} | {r.learning_rate:.3g} | {r.compute:.4g} | '
                   f'{100 * r.top1:.2f}% | {"*" if study.on_ft_frontier(r) else ""} |')
    lines += [''] + _fit_table(study.ft_fits, study.ft_frontiers)
    if CONVNET in study.ft_fits and VIT in study.ft_fits:
      lines += ['', _answer_finetuned(study, compute_label)]
  lines += ['', '## Compute: estimated and measured', '',
            'Estimated: analytic training FLOPs at the budget\'s hardware and mfu; measured: devices x wall time as '
            'logged (compute/core_hours); utilisation: as logged (compute/mfu, analytic FLOPs over measured '
            'core-seconds x peak per core; on CPU the peak is a matmul measured at each start).', '',
            '| family | runs | train FLOPs | est. core-h | measured core-h | median utilisation '
            '| measured core-h / FLOP |',
            '|---|---:|---:|---:|---:|---:|---:|']
  for family, used in study.utilisation.items():
    members = [r for r in study.runs if r.family == family]
    estimated = [r.budget_core_hours for r in members if r.budget_core_hours is not None]
    if used is None:
      lines.append(f'| {family} | 0 | - | {_number(sum(estimated) if estimated else None)} | - | - | - |')
      continue
    total_estimate = _number(sum(estimated) if estimated else None)
    lines.append(f'| {family} | {used.runs} | {used.train_flops:.4g} | {total_estimate} | {used.core_hours:.4g} | '
                 f'{_number(used.median_mfu, ".3%")} | {used.core_hours_per_flop:.4g} |')
  lines += ['', '| family | model | epochs | lr | train FLOPs | est. core-h | measured core-h | utilisation |',
            '|---|---|---:|---:|---:|---:|---:|---:|']
  for r in study.runs:
    lines.append(f'| {r.family} | {r.model} | {r.epochs:.4g} | {r.learning_rate:.3g} | {_number(r.train_flops)} | '
                 f'{_number(r.budget_core_hours)} | {_number(r.core_hours)} | {_number(r.mfu, ".3%")} |')
  if study.needs:
    lines += ['', '## Fits that need more runs', ''] + [f'- {n}' for n in study.needs]
  if scope:
    lines += ['', '## What these runs can and cannot show', '', scope.strip()]
  return '\n'.join(lines) + '\n'


def _answer(study: Study) -> str:
  c = study.comparison
  if c is None:
    if not all(isinstance(study.fits[f], PowerLawFit) for f in (CONVNET, VIT)):
      return 'No answer: both families need a fitted frontier (see the fits above).'
    return 'No answer: the two families\' frontiers cover compute ranges that do not overlap.'
  diff = (c.ratio - 1) * 100
  head = (f'At equal compute (C = {c.compute:.4g}, the geometric mean of the overlap {c.overlap[0]:.4g}-'
          f'{c.overlap[1]:.4g} of the two frontiers), the best ConvNet\'s held-out loss is {c.ratio:.4f}x the best '
          f'ViT\'s ({diff:+.2f}%')
  if c.ratio_ci:
    head += f'; {study.confidence:.0%} CI {c.ratio_ci[0]:.4f}-{c.ratio_ci[1]:.4f}'
  head += f'; {c.ratio_range[0]:.4f}-{c.ratio_range[1]:.4f}x across the overlap): '
  if c.ratio_ci is None:
    tail = ('the ConvNet is lower' if c.ratio < 1 else 'the ViT is lower' if c.ratio > 1 else 'equal') + \
        ' (no confidence bands: a fit has too few frontier runs).'
  else:
    tail = {'matches': 'ConvNets match ViTs (the difference is within the fits\' confidence bands).',
            'convnet better': 'the ConvNet is better (lower loss, outside the fits\' confidence bands).',
            'vit better': 'the ViT is better (lower loss, outside the fits\' confidence bands).'}[c.verdict]
  return '**Answer:** ' + head + tail


def _answer_finetuned(study: Study, compute_label: str) -> str:
  """The paper's comparison: finetuned top-1 of each family's fit at equal pretraining compute."""
  c = study.ft_comparison
  if c is None:
    if not all(isinstance(study.ft_fits[f], PowerLawFit) for f in (CONVNET, VIT)):
      return '**Answer (finetuned):** none: both families need a fitted finetuned frontier (see the fits above).'
    return ('**Answer (finetuned):** none: the two families\' finetuned frontiers cover pretraining compute '
            'ranges that do not overlap.')
  fits = {f: study.ft_fits[f] for f in (CONVNET, VIT)}
  top1 = {f: 100 * (1 - float(fit.predict(c.compute))) for f, fit in fits.items()}
  text = (f'**Answer (finetuned):** at equal pretraining compute C = {c.compute:.4g} ({compute_label}; the '
          f'geometric mean of the overlap {c.overlap[0]:.4g}-{c.overlap[1]:.4g}), finetuned NFNet top-1 '
          f'{top1[CONVNET]:.2f}% vs ViT {top1[VIT]:.2f}%')
  if c.ratio_ci is None:
    return text + (' (no intervals: a fit has too few frontier runs, so this is a point estimate only; the '
                   f'NFNet\'s top-1 error is {c.ratio:.3f}x the ViT\'s).')
  bands = {f: fit.band(c.compute) for f, fit in fits.items()}
  ranges = {f: f'{100 * (1 - float(hi)):.2f}-{100 * (1 - float(lo)):.2f}%' for f, (lo, hi) in bands.items()}
  text += (f' ({study.confidence:.0%} bands of the fits: NFNet {ranges[CONVNET]}, ViT {ranges[VIT]}; the NFNet\'s '
           f'top-1 error is {c.ratio:.3f}x the ViT\'s, CI {c.ratio_ci[0]:.3f}-{c.ratio_ci[1]:.3f}): ')
  return text + {'matches': 'the two match within the fits\' intervals; these runs cannot tell them apart here.',
                 'convnet better': 'the NFNet is more accurate, outside the fits\' intervals.',
                 'vit better': 'the ViT is more accurate, outside the fits\' intervals.'}[c.verdict]


_COLORMAPS = {CONVNET: 'Blues', VIT: 'Oranges'}
_SPARE_COLORMAPS = ('Greens', 'Purples', 'Reds', 'Greys')


def plot(study: Study, path: str, compute_label: str, title: str = 'Held-out loss vs training compute') -> None:
  """Loss against compute on log-log axes: one line per model (its chosen runs), shaded by size within its
  family's colour; the frontier circled; each family's fitted power law dashed over its frontier's range. With
  finetuned runs, a second panel: finetuned top-1 error against pretraining compute, fits with their bands."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  panels = 2 if study.finetuned else 1
  fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 5.6), dpi=125, squeeze=False)
  styles = _family_styles(study, matplotlib)
  _loss_panel(axes[0][0], study, styles, compute_label, title)
  if panels == 2:
    _finetune_panel(axes[0][1], study, styles, compute_label)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _family_styles(study: Study, matplotlib) -> dict[str, tuple]:
  """family -> (colormap, marker)."""
  spare = iter(_SPARE_COLORMAPS * 10)
  markers = iter('o s ^ D v P X'.split() * 10)
  return {family: (matplotlib.colormaps[_COLORMAPS.get(family) or next(spare)], next(markers))
          for family in sorted({r.family for r in study.runs})}


def _model_colors(study: Study, family: str, cmap) -> dict[str, tuple]:
  models = sorted({(r.params, r.model) for r in study.runs if r.family == family})
  return {model: cmap(0.45 + 0.5 * i / max(len(models) - 1, 1)) for i, (_, model) in enumerate(models)}


def _log_axes(ax, compute_label: str, ylabel: str, title: str, matplotlib) -> None:
  ax.set_xscale('log')
  ax.set_yscale('log')
  plain = matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}')  # The values span less than a decade.
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_formatter(plain)
  ax.set_xlabel(compute_label)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.25)
  ax.legend(fontsize=7, ncol=2)


def _loss_panel(ax, study: Study, styles, compute_label: str, title: str) -> None:
  import matplotlib
  best = set(map(id, best_per_budget(study.runs)))
  for family, (cmap, marker) in styles.items():
    for model, color in _model_colors(study, family, cmap).items():
      runs = [r for r in study.runs if r.family == family and r.model == model]
      line = sorted((r for r in runs if id(r) in best), key=lambda r: r.compute)
      ax.plot([r.compute for r in line], [r.loss for r in line], marker=marker, color=color, lw=1.5, ms=6,
              label=f'{family} {model} ({_count(runs[0].params)})')
      others = [r for r in runs if id(r) not in best]  # Learning rates that lost their epoch budget's sweep.
      if others:
        ax.scatter([r.compute for r in others], [r.loss for r in others], marker=marker, color=color, alpha=0.3, s=16)
    fit = study.fits[family]
    front = study.frontiers[family]
    if isinstance(fit, PowerLawFit):
      grid = np.geomspace(front[0].compute, front[-1].compute, 100)
      ax.plot(grid, fit.predict(grid), ls='--', lw=2, color=cmap(0.95), label=f'{family} fit: L = {fit.formula()}')
  front = [r for f in study.frontiers.values() for r in f]
  ax.scatter([r.compute for r in front], [r.loss for r in front], s=140, facecolors='none', edgecolors='black',
             linewidths=1.4, zorder=5, label='compute-efficient frontier')
  _log_axes(ax, compute_label, 'held-out loss', title, matplotlib)


def _finetune_panel(ax, study: Study, styles, compute_label: str) -> None:
  import matplotlib
  for family, (cmap, marker) in styles.items():
    for model, color in _model_colors(study, family, cmap).items():
      line = sorted((r for r in study.finetuned if r.family == family and r.model == model), key=lambda r: r.compute)
      if line:
        ax.plot([r.compute for r in line], [r.top1_error for r in line], marker=marker, color=color, lw=1.5, ms=6,
                label=f'{family} {model}')
    fit, front = study.ft_fits.get(family), study.ft_frontiers.get(family)
    if isinstance(fit, PowerLawFit):
      grid = np.geomspace(front[0].compute, front[-1].compute, 100)
      ax.plot(grid, fit.predict(grid), ls='--', lw=2, color=cmap(0.95), label=f'{family} fit: err = {fit.formula()}')
      if fit.cov is not None:
        ax.fill_between(grid, *fit.band(grid), color=cmap(0.6), alpha=0.2, lw=0,
                        label=f'{family} {study.confidence:.0%} band')
  front = [r for f in study.ft_frontiers.values() for r in f]
  ax.scatter([r.compute for r in front], [r.top1_error for r in front], s=140, facecolors='none',
             edgecolors='black', linewidths=1.4, zorder=5, label='frontier')
  _log_axes(ax, f'pretraining {compute_label}', 'finetuned top-1 error (1 - top-1)',
            'Finetuned top-1 error vs pretraining compute', matplotlib)
