"""Scaling analysis of a compute-budget study: frontiers, power-law fits, compute-optimal allocation.

Pure functions over `Run`s (one finished pretraining run each: its model, epoch budget, compute, final
held-out loss, the loss its learning rate was chosen on, and the top-1 of its finetune run if it has one);
`python -m train.analyze` reads workdirs into Runs, and train/study/report.py renders the report and figure.
Fits are least squares in log-log space, where the paper's loss-vs-compute frontier is a straight line; the
finetuned analysis fits the top-1 error (1 - top-1) the same way, against pretraining compute.
"""
from collections.abc import Sequence
import dataclasses
import math
import warnings

import numpy as np
from scipy import optimize, stats

CONVNET, VIT = 'nfnet', 'vit'


@dataclasses.dataclass(frozen=True)
class Run:
  family: str
  model: str
  params: int
  epochs: float
  learning_rate: float
  compute: float
  loss: float  # The reported held-out loss.
  workdir: str = ''
  select_loss: float | None = None  # What the learning rate is chosen on (minival); None: `loss` itself.
  top1: float | None = None  # Finetuned top-1 of its finetune run; None: not finetuned (or not finished).
  train_flops: float | None = None  # Analytic; and the measured and estimated cost of the same training:
  core_hours: float | None = None
  budget_core_hours: float | None = None
  mfu: float | None = None  # Logged utilisation (train FLOPs / (measured core-seconds x peak per core)).

  @property
  def selection(self) -> float:
    return self.loss if self.select_loss is None else self.select_loss

  @property
  def top1_error(self) -> float | None:
    return None if self.top1 is None else 1.0 - self.top1


def frontier(points: Sequence[Sequence]) -> list:
  """The compute-efficient frontier of (compute, loss, label...) points, sorted by compute.

  A point is kept unless another has compute <= and loss strictly <: ties in both are all kept, and so is
  a point that only equals the best loss reached with less compute.
  """
  ordered = sorted(points, key=lambda p: (p[0], p[1]))
  kept, best = [], math.inf
  i = 0
  while i < len(ordered):
    j = i
    while j < len(ordered) and ordered[j][0] == ordered[i][0]:
      j += 1
    best = min(best, ordered[i][1])  # Sorted by loss within equal compute: [i] is the group's lowest.
    kept.extend(p for p in ordered[i:j] if p[1] <= best)
    i = j
  return kept


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """loss = E + a * C^b (E = 0 without the irreducible term); CIs are (low, high) or None."""
  a: float
  b: float
  E: float
  a_ci: tuple[float, float] | None
  b_ci: tuple[float, float] | None
  E_ci: tuple[float, float] | None
  r2: float
  n: int
  confidence: float
  irreducible: bool
  # Parameters (log a at the mean log C, b[, E / scale]), their covariance, and what undoes the centring.
  theta: tuple[float, ...] = dataclasses.field(repr=False, default=())
  cov: np.ndarray | None = dataclasses.field(repr=False, default=None, compare=False)
  x_mean: float = dataclasses.field(repr=False, default=0.0)
  E_scale: float = dataclasses.field(repr=False, default=1.0)
  t: float = dataclasses.field(repr=False, default=math.nan)

  def predict(self, compute) -> np.ndarray:
    return np.exp(self._log_predict(np.log(np.asarray(compute, np.float64)))[0])

  def band(self, compute) -> tuple[np.ndarray, np.ndarray]:
    """Confidence band of the fitted mean loss at `compute` (the prediction itself when there is no CI)."""
    log_pred, _ = self._log_predict(np.log(np.asarray(compute, np.float64)))
    half = self.log_half_width(compute)
    return np.exp(log_pred - half), np.exp(log_pred + half)

  def log_half_width(self, compute) -> np.ndarray:
    """Half-width of the band in log loss (0 without a CI)."""
    _, grad = self._log_predict(np.log(np.asarray(compute, np.float64)))
    if self.cov is None:
      return np.zeros(grad.shape[1:])
    var = np.einsum('i...,ij,j...->...', grad, self.cov, grad)
    return self.t * np.sqrt(np.maximum(var, 0.0))

  def _log_predict(self, x):
    """log loss at log compute `x`, and its gradient with respect to theta."""
    xc = x - self.x_mean
    u = np.exp(self.theta[0] + self.theta[1] * xc)
    if not self.irreducible:
      return np.log(u), np.stack([np.ones_like(xc), xc])
    e = self.theta[2] * self.E_scale
    return np.log(e + u), np.stack([u, u * xc, np.full_like(u, self.E_scale)]) / (e + u)

  def formula(self) -> str:
    term = f'{self.a:.4g}·C^{self.b:.4g}'
    return f'{self.E:.4g} + {term}' if self.irreducible else term


def fit_power_law(compute, loss, irreducible: bool = False, confidence: float = 0.95) -> PowerLawFit:
  """Fits loss = a * C^b (or E + a * C^b, E >= 0) by least squares on log loss.

  CIs are Student-t intervals on the coefficients (n - 2 or n - 3 degrees of freedom): b and E directly,
  a through log a. Two points (three with E) give an exact fit without CIs.
  """
  c, y = np.asarray(compute, np.float64).ravel(), np.asarray(loss, np.float64).ravel()
  if c.shape != y.shape:
    raise ValueError(f'compute and loss differ in length ({c.size} vs {y.size}).')
  k = 3 if irreducible else 2
  if c.size < k:
    raise ValueError(f'a power-law fit{" with E" if irreducible else ""} needs at least {k} points, got {c.size}.')
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y)) and np.all(c > 0) and np.all(y > 0)):
    raise ValueError('power-law fits need finite, positive compute and loss values.')
  x = np.log(c)
  if np.unique(x).size < 2:  # In log space: values a rounding apart are one point there.
    raise ValueError('a power-law fit needs at least two distinct compute values.')
  x_mean = float(x.mean())
  xc, ly = x - x_mean, np.log(y)
  dof = c.size - k
  if irreducible:
    theta, cov, scale = _fit_with_floor(xc, ly, y.min())
  else:
    theta, cov, scale = _fit_line(xc, ly), None, 1.0
  fit = PowerLawFit(a=0.0, b=0.0, E=0.0, a_ci=None, b_ci=None, E_ci=None, r2=math.nan, n=c.size,
                    confidence=confidence, irreducible=irreducible, theta=tuple(theta), x_mean=x_mean,
                    E_scale=scale)
  residuals = ly - fit._log_predict(x)[0]
  sse = float(residuals @ residuals)
  sst = float(((ly - ly.mean()) ** 2).sum())
  log_a, b = theta[0] - theta[1] * x_mean, theta[1]
  E = theta[2] * scale if irreducible else 0.0
  if not irreducible and dof > 0:  # Centred x: the intercept and slope are uncorrelated.
    cov = sse / dof * np.diag([1.0 / c.size, 1.0 / float(xc @ xc)])
  cis = {}
  if dof > 0 and cov is not None:
    t = float(stats.t.ppf(0.5 + confidence / 2, dof))
    # log a = theta0 - x_mean * theta1: the centred intercept's variance carried back to C = 1.
    to_log_a = np.zeros(len(theta))
    to_log_a[:2] = 1.0, -x_mean
    se_log_a = math.sqrt(max(to_log_a @ cov @ to_log_a, 0.0))
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    cis['a_ci'] = (math.exp(log_a - t * se_log_a), math.exp(log_a + t * se_log_a))
    cis['b_ci'] = (float(b - t * se[1]), float(b + t * se[1]))
    if irreducible:
      cis['E_ci'] = (max(float(E - t * se[2] * scale), 0.0), float(E + t * se[2] * scale))
    cis.update(cov=cov, t=t)
  r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else math.nan)
  return dataclasses.replace(fit, a=math.exp(log_a), b=float(b), E=float(E), r2=r2, **cis)


def _fit_line(xc, ly):
  slope = float(xc @ (ly - ly.mean()) / (xc @ xc))
  return np.array([ly.mean(), slope])


def _fit_with_floor(xc, ly, min_loss):
  """theta = (log a at the mean log C, b, E / min_loss): all of order one, so the fit is well conditioned."""
  def model(x, log_a, b, e):
    return np.log(e * min_loss + np.exp(log_a + b * x))

  starts = []
  for e in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99):  # A line through log(loss - E) for a few guesses of E.
    line = _fit_line(xc, np.log(np.exp(ly) - e * min_loss))
    theta = np.array([*line, e])
    starts.append((float(((model(xc, *theta) - ly) ** 2).sum()), theta))
  p0 = min(starts, key=lambda s: s[0])[1]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', optimize.OptimizeWarning)  # Infinite covariance at zero dof.
    theta, cov = optimize.curve_fit(model, xc, ly, p0=p0, bounds=([-np.inf, -np.inf, 0.0], np.inf),
                                    method='trf', ftol=1e-14, xtol=1e-14, gtol=1e-14, max_nfev=10000)
  return theta, (cov if np.all(np.isfinite(cov)) else None), float(min_loss)


def best_per_budget(runs: Sequence[Run]) -> list[Run]:
  """Per (family, model, epochs), the run of lowest selection loss: the learning-rate sweep's winner, chosen on
  held-out data that is not the reported split where the runs log both."""
  best = {}
  for r in runs:
    key = (r.family, r.model, r.epochs)
    if key not in best or r.selection < best[key].selection:
      best[key] = r
  return sorted(best.values(), key=lambda r: (r.family, r.params, r.model, r.compute))


@dataclasses.dataclass(frozen=True)
class Allocation:
  compute: float
  model: str
  params: int
  epochs: float
  loss: float


@dataclasses.dataclass(frozen=True)
class ComputeOptimal:
  """The best (model, epochs) per compute level; params_opt ∝ C^alpha and epochs_opt ∝ C^beta."""
  allocations: list[Allocation]
  params_fit: PowerLawFit | None
  epochs_fit: PowerLawFit | None

  @property
  def alpha(self) -> float | None:
    return self.params_fit.b if self.params_fit else None

  @property
  def beta(self) -> float | None:
    return self.epochs_fit.b if self.epochs_fit else None


def compute_levels(runs: Sequence[Run], num: int = 8) -> np.ndarray:
  """The sweep's shared compute budgets (reached by two or more models, to 4 significant digits) where there
  are at least two of them, else `num` log-spaced levels across the runs' compute range."""
  groups = {}
  for r in runs:
    groups.setdefault(float(f'{r.compute:.4g}'), []).append(r)
  shared = [np.exp(np.mean(np.log([r.compute for r in g]))) for _, g in sorted(groups.items())
            if len({r.model for r in g}) >= 2]
  if len(shared) >= 2:
    return np.array(shared)
  c = np.array([r.compute for r in runs])
  if c.min() == c.max():  # geomspace would return the one value with rounding apart, as if several.
    return c[:1]
  return np.geomspace(c.min(), c.max(), num)


def compute_optimal(runs: Sequence[Run], levels=None, num_levels: int = 8,
                    confidence: float = 0.95) -> ComputeOptimal:
  """At each compute level, the model whose loss-vs-compute curve is lowest there, and its epochs.

  Each model's curve is linear in log-log between its runs (the best learning rate per epoch budget) and is
  not extrapolated beyond them (by more than the 0.1% that budgets shared by several models may differ).
  The winner's epoch budget is the level over its compute per epoch.
  """
  if len({r.family for r in runs}) > 1:
    raise ValueError(f'compute_optimal takes one family\'s runs, got {sorted({r.family for r in runs})}.')
  runs = best_per_budget(runs)
  if not runs:
    return ComputeOptimal([], None, None)
  levels = compute_levels(runs, num_levels) if levels is None else np.asarray(levels, np.float64)
  curves = {}
  for model in dict.fromkeys(r.model for r in runs):
    points = sorted((r for r in runs if r.model == model), key=lambda r: r.compute)
    log_c, log_loss = np.log([r.compute for r in points]), np.log([r.loss for r in points])
    per_epoch = math.exp(np.mean([math.log(r.compute / r.epochs) for r in points]))
    curves[model] = (log_c, log_loss, points[0].params, per_epoch)
  allocations = []
  for level in levels:
    x = math.log(level)
    reached = {m: float(np.exp(np.interp(x, log_c, log_loss))) for m, (log_c, log_loss, _, _) in curves.items()
               if log_c[0] - 1e-3 <= x <= log_c[-1] + 1e-3}
    if reached:
      model = min(reached, key=reached.get)
      _, _, params, per_epoch = curves[model]
      allocations.append(Allocation(float(level), model, params, float(level / per_epoch), reached[model]))
  params_fit = epochs_fit = None
  # With one model the optimal size cannot move: its growth rate would be a meaningless exact 0.
  if len(curves) >= 2 and len({a.compute for a in allocations}) >= 2:
    c = [a.compute for a in allocations]
    params_fit = fit_power_law(c, [a.params for a in allocations], confidence=confidence)
    epochs_fit = fit_power_law(c, [a.epochs for a in allocations], confidence=confidence)
  return ComputeOptimal(allocations, params_fit, epochs_fit)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The best ConvNet's fitted loss over the best ViT's, at equal compute within both families' ranges."""
  compute: float  # Geometric mean of the overlap.
  overlap: tuple[float, float]
  ratio: float
  ratio_ci: tuple[float, float] | None  # From both fits' confidence bands; None without CIs.
  ratio_range: tuple[float, float]  # Lowest and highest ratio across the overlap.

  @property
  def verdict(self) -> str:
    lo, hi = self.ratio_ci or (self.ratio, self.ratio)
    if lo <= 1.0 <= hi:
      return 'matches'
    return 'convnet better' if hi < 1.0 else 'vit better'


def compare(convnet: PowerLawFit, vit: PowerLawFit, convnet_range: tuple[float, float],
            vit_range: tuple[float, float]) -> Comparison | None:
  """None when the two compute ranges do not overlap."""
  lo, hi = max(convnet_range[0], vit_range[0]), min(convnet_range[1], vit_range[1])
  if lo > hi:
    return None
  at = math.sqrt(lo * hi)
  ratio = float(convnet.predict(at) / vit.predict(at))
  ratio_ci = None
  if convnet.cov is not None and vit.cov is not None:
    # The two fits are independent: the log ratio's half-width adds their bands' in quadrature.
    half = math.hypot(float(convnet.log_half_width(at)), float(vit.log_half_width(at)))
    ratio_ci = (ratio * math.exp(-half), ratio * math.exp(half))
  grid = np.geomspace(lo, hi, 65)
  ratios = convnet.predict(grid) / vit.predict(grid)
  return Comparison(at, (lo, hi), ratio, ratio_ci, (float(ratios.min()), float(ratios.max())))


@dataclasses.dataclass(frozen=True)
class Utilisation:
  """A family's hardware efficiency over its runs that logged measured compute."""
  runs: int
  train_flops: float  # Analytic, summed.
  core_hours: float  # Measured, summed.
  median_mfu: float | None  # Median of the runs' logged utilisation (a sweep's first run of a model also pays its
  # compilation, which the later runs share); None where no run logged one.

  @property
  def core_hours_per_flop(self) -> float:
    return self.core_hours / self.train_flops


def utilisation(runs: Sequence[Run]) -> Utilisation | None:
  measured = [r for r in runs if r.train_flops and r.core_hours]
  if not measured:
    return None
  mfus = [r.mfu for r in measured if r.mfu is not None]
  return Utilisation(len(measured), float(sum(r.train_flops for r in measured)),
                     float(sum(r.core_hours for r in measured)), float(np.median(mfus)) if mfus else None)


@dataclasses.dataclass(frozen=True)
class Study:
  runs: list[Run]
  frontiers: dict[str, list[Run]]  # Per family, over its chosen (best learning rate) runs.
  fits: dict[str, PowerLawFit | str]  # A fit, or why there is none.
  optimal: dict[str, ComputeOptimal]
  comparison: Comparison | None
  confidence: float
  needs: list[str] = dataclasses.field(default_factory=list)  # One line per fit that needs more runs.
  # The finetuned analysis: top-1 error against pretraining compute, per family with finetuned runs.
  ft_frontiers: dict[str, list[Run]] = dataclasses.field(default_factory=dict)
  ft_fits: dict[str, PowerLawFit | str] = dataclasses.field(default_factory=dict)
  ft_comparison: Comparison | None = None
  utilisation: dict[str, Utilisation | None] = dataclasses.field(default_factory=dict)

  def on_frontier(self, run: Run) -> bool:
    return any(run is r for r in self.frontiers.get(run.family, ()))

  def on_ft_frontier(self, run: Run) -> bool:
    return any(run is r for r in self.ft_frontiers.get(run.family, ()))

  def chosen(self, run: Run) -> bool:
    return any(run is r for r in best_per_budget(self.runs))

  @property
  def finetuned(self) -> list[Run]:
    return [r for r in self.runs if r.top1 is not None]


def _frontier_fit(points: Sequence[tuple[float, float, Run]], irreducible: bool,
                  confidence: float) -> tuple[list[Run], PowerLawFit | str]:
  kept = frontier(points)
  front = [p[2] for p in kept]
  try:
    return front, fit_power_law([p[0] for p in kept], [p[1] for p in kept], irreducible=irreducible,
                                confidence=confidence)
  except ValueError as e:
    return front, f'no fit on {len(front)} frontier runs: {e}'


def _compare_families(frontiers, fits) -> Comparison | None:
  if not (isinstance(fits.get(CONVNET), PowerLawFit) and isinstance(fits.get(VIT), PowerLawFit)):
    return None
  span = {f: (frontiers[f][0].compute, frontiers[f][-1].compute) for f in (CONVNET, VIT)}
  return compare(fits[CONVNET], fits[VIT], span[CONVNET], span[VIT])


def analyze(runs: Sequence[Run], irreducible: bool = False, confidence: float = 0.95,
            num_levels: int = 8) -> Study:
  """Per family: the frontier of its chosen runs (the best learning rate of each model and epoch budget), a
  power law through it, the compute-optimal allocation; the same frontier and fit of the finetuned top-1 error
  against pretraining compute; its measured utilisation; then ConvNet vs ViT in both terms."""
  runs = sorted(runs, key=lambda r: (r.family, r.params, r.model, r.compute, r.learning_rate))
  families = sorted({r.family for r in runs})
  frontiers, fits, optimal, ft_frontiers, ft_fits, used = {}, {}, {}, {}, {}, {}
  for family in families:
    members = [r for r in runs if r.family == family]
    chosen = best_per_budget(members)
    frontiers[family], fits[family] = _frontier_fit([(r.compute, r.loss, r) for r in chosen], irreducible,
                                                    confidence)
    optimal[family] = compute_optimal(members, num_levels=num_levels, confidence=confidence)
    finetuned = [r for r in members if r.top1 is not None]
    if finetuned:
      if any(r.top1_error <= 0 for r in finetuned):  # A perfect score has no place on a log axis.
        ft_frontiers[family] = []
        ft_fits[family] = 'no fit: a finetuned top-1 of 100% has zero error, which a power law cannot fit'
      else:
        ft_frontiers[family], ft_fits[family] = _frontier_fit([(r.compute, r.top1_error, r) for r in finetuned],
                                                              irreducible, confidence)
    used[family] = utilisation(members)
  study = Study(runs, frontiers, fits, optimal, _compare_families(frontiers, fits), confidence,
                ft_frontiers=ft_frontiers, ft_fits=ft_fits, ft_comparison=_compare_families(ft_frontiers, ft_fits),
                utilisation=used)
  return dataclasses.replace(study, needs=needs_more_runs(study, irreducible))


def needs_more_runs(study: Study, irreducible: bool = False) -> list[str]:
  """One line per fit that has too few runs to be made (or to have intervals), saying what would make it."""
  k = 3 if irreducible else 2
  lines = []
  for family, fit in study.fits.items():
    n = len({r.compute for r in study.frontiers[family]})
    if isinstance(fit, str):
      lines.append(f'{family}: the power law through the frontier needs {k} or more frontier runs of distinct '
                   f'compute, it has {n}; add epoch budgets or models.')
    elif fit.b_ci is None:
      lines.append(f'{family}: the power law through the frontier has no {study.confidence:.0%} intervals: its '
                   f'{fit.n} frontier runs fit it exactly, {k + 1} or more give intervals; add epoch budgets or '
                   'models.')
  for family, opt in study.optimal.items():
    models = sorted({r.model for r in study.runs if r.family == family})
    if len(models) < 2:
      lines.append(f'{family}: the compute-optimal growth rates (params_opt, epochs_opt ∝ C^x) are fitted over '
                   f'models and need runs of 2 or more, it has 1 ({models[0]}); add models.')
    elif opt.params_fit is None:
      lines.append(f'{family}: the compute-optimal growth rates need 2 or more compute levels reached by its '
                   f'models, it has {len(opt.allocations)}; add epoch budgets that overlap in compute.')
  if any(f in study.fits for f in (CONVNET, VIT)) and study.comparison is None:
    missing = [f for f in (CONVNET, VIT) if not isinstance(study.fits.get(f), PowerLawFit)]
    why = (f'{", ".join(missing)} {"has" if len(missing) == 1 else "have"} none yet; add runs.' if missing else
           'their frontiers cover compute ranges that do not overlap; add budgets that make them overlap.')
    lines.append(f'ConvNets vs ViTs: the answer needs a fitted frontier of both families ({CONVNET} and {VIT}); {why}')
  for family, fit in study.ft_fits.items():
    n = len({r.compute for r in study.ft_frontiers[family]})
    if isinstance(fit, str):
      lines.append(f'{family}: the power law of the finetuned top-1 error needs {k} or more finetuned runs of '
                   f'distinct pretraining compute on its frontier, it has {n}; finetune more runs (more epoch '
                   "budgets or models, or FINETUNE_SELECT='all').")
    elif fit.b_ci is None:
      lines.append(f'{family}: the power law of the finetuned top-1 error has no {study.confidence:.0%} intervals: '
                   f'its {fit.n} frontier runs fit it exactly, {k + 1} or more give intervals; finetune more runs.')
  if study.ft_fits and study.ft_comparison is None:
    missing = [f for f in (CONVNET, VIT) if not isinstance(study.ft_fits.get(f), PowerLawFit)]
    why = (f'{", ".join(missing)} {"has" if len(missing) == 1 else "have"} none yet; finetune more runs.' if missing
           else 'their frontiers cover pretraining compute ranges that do not overlap; add budgets that overlap.')
    lines.append(f'ConvNets vs ViTs finetuned: the answer needs a fitted finetuned frontier of both families; {why}')
  return lines


def __getattr__(name):
  """`markdown` and `plot` moved to train/study/report.py; still importable from here."""
  if name in ('markdown', 'plot'):
    from train.study import report  # pylint: disable=g-import-not-at-top  (report imports this module)
    return getattr(report, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
