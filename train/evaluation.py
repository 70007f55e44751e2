"""The evaluation suite: named evaluators over held-out splits, and one pass of each over the parameters.

Without `config.evals`, one evaluator reads `config.data`'s eval_split and logs `eval/<metric>` (what the sweep,
the study analysis and the tests have always read). `config.evals` names several instead:

  c.evals = dict(minival=dict(split='train[90%:]'), test=dict(split='test', pp='...', every_steps=1000))

each logged as `eval/<name>/<metric>`. An evaluator is `config.data` with its own fields over it: `split` (the
eval_split), `pp` (the pp_eval; default config.data's), any other data field (`name` and `data_dir` read another
dataset), `metrics` (the objective's eval_metrics to log; default all) and `every_steps` (default
config.eval_every_steps; 0: only with eval_at_start or train.evaluate). Its batches come from the data pipeline's
eval iterator, so every example counts once whatever the process count.

With EMA (the state holds 'ema') each evaluator runs twice: the EMA parameters under `eval/...` (what the run is
evaluated, sampled and exported with) and the raw trainable ones under `eval_raw/...`, same names after the prefix.
"""
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import formats, pipeline
from train import sharding

_NAME = re.compile(r'[a-z0-9_]+')
_OWN_FIELDS = ('split', 'pp', 'metrics', 'every_steps')
_ALIASES = {'split': 'eval_split', 'pp': 'pp_eval'}  # The evaluator's word -> the data field it sets.


@dataclasses.dataclass(frozen=True)
class Spec:
  """One evaluator as configured: `name` None for the unnamed one of config.data (keys eval/<metric>)."""
  name: str | None
  data: ml_collections.ConfigDict
  every_steps: int
  metrics: tuple[str, ...] | None  # None: every metric the objective's eval_summary gives.

  def key(self, prefix: str, metric: str) -> str:
    return f'{prefix}/{metric}' if self.name is None else f'{prefix}/{self.name}/{metric}'

  def due(self, step: int, is_last: bool) -> bool:
    return bool(self.every_steps) and (step % self.every_steps == 0 or is_last)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  spec: Spec
  batches: Callable[[], Iterator[dict]]  # A fresh pass over this process's share of the split.
  count: int                              # What the objective's summed 'count' must equal after a pass.


def _is_mapping(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _as_dict(value) -> dict:
  return dict(value.to_dict() if hasattr(value, 'to_dict') else value)


def specs(config, objective) -> list[Spec]:
  """The evaluators `config` asks for, checked (names, fields, metrics, intervals) before any data is read."""
  data = _as_dict(config.data)
  default_every = config.get('eval_every_steps') or 0
  evals = config.get('evals')
  if not evals:
    return [Spec(None, ml_collections.ConfigDict(data), default_every, None)]
  if not _is_mapping(evals):
    raise ValueError(f'config.evals must map evaluator names to their fields, e.g. '
                     f"dict(minival=dict(split='train[90%:]')); got {type(evals).__name__}.")
  known = set(data) | set(formats.get_format(data).defaults) | {'name', 'data_dir'} | set(_OWN_FIELDS)
  out = []
  for name, fields in _as_dict(evals).items():
    where = f'config.evals.{name}'
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise ValueError(f'config.evals: evaluator name {name!r} must be lowercase letters, digits and _ '
                       '(it becomes part of the eval/<name>/<metric> keys); rename it.')
    if not _is_mapping(fields):
      raise ValueError(f"{where} must be a dict of fields, e.g. dict(split='test'); got {fields!r}.")
    fields = _as_dict(fields)
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'{where}.{unknown[0]} is not an evaluator field; use split, pp, metrics, every_steps or a '
                       f'field of config.data ({", ".join(sorted(set(known) - set(_OWN_FIELDS)))}).')
    for own, field in _ALIASES.items():
      if own in fields and field in fields:
        raise ValueError(f'{where} sets both {own} and {field}; keep {own}.')
    metrics = fields.pop('metrics', None)
    if metrics is not None:
      metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
      available = tuple(getattr(objective, 'eval_metrics', ()))
      bad = [m for m in metrics if m not in available]
      if bad or not metrics:
        what = f'{bad[0]!r} is not a metric of this objective' if bad else 'it is empty'
        raise ValueError(f'{where}.metrics={list(metrics)}: {what}; choose from {list(available)}.')
    every = fields.pop('every_steps', None)
    every = default_every if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
      raise ValueError(f'{where}.every_steps={every!r} must be a whole number of steps >= 0 (0: never during '
                       f'training); set --{where}.every_steps.')
    own = {_ALIASES.get(k, k): v for k, v in fields.items()}
    if own.get('pp_eval') is None:
      own.pop('pp_eval', None)  # Unset: config.data's.
    out.append(Spec(name, ml_collections.ConfigDict({**data, **own}), every, metrics))
  return out


def build(config, objective, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
          ) -> list[Evaluator]:
  """The evaluators of `config` with their batches (each split is opened now, so a missing one fails here)."""
  built = []
  for spec in specs(config, objective):
    try:
      batches, count = pipeline.make_eval_iter(spec.data, global_batch_size=global_batch_size,
                                               process_index=process_index, process_count=process_count)
    except (ValueError, FileNotFoundError) as e:  # A missing split or dataset: say which evaluator names it.
      if spec.name is None:
        raise
      raise type(e)(f'config.evals.{spec.name}: {e}') from None
    built.append(Evaluator(spec, batches, count))
  return built


def evaluate(evaluator: Evaluator, fns, objective, trainable, frozen) -> dict[str, float]:
  """The objective's eval metrics of `trainable` (unprefixed, all of them) over one pass of the split."""
  sums = None
  for local in evaluator.batches():
    out = fns.eval(trainable, frozen, sharding.global_batch(local, fns.batch_sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.tree.map(lambda x: float(np.asarray(x, np.float64)), jax.device_get(sums))
  if int(sums['count']) != evaluator.count:
    raise RuntimeError(f'evaluation {evaluator.spec.name or "eval"} saw {int(sums["count"])} examples, '
                       f'expected {evaluator.count}.')
  return objective.eval_summary(sums)


def parameter_sets(state: Mapping[str, Any]) -> dict[str, Any]:
  """Prefix -> trainable tree to evaluate: the evaluated one (EMA when kept) under 'eval', and with EMA the raw
  trainable parameters under 'eval_raw'."""
  if 'ema' in state:
    return {'eval': state['ema'], 'eval_raw': state['trainable']}
  return {'eval': state['trainable']}


def run(evaluators, fns, objective, state, frozen) -> dict[str, dict[str, float]]:
  """Every evaluator in `evaluators` over every parameter set of `state` (a train state, or any dict with
  'trainable' and optionally 'ema'): evaluator label -> its logged metrics, keys prefixed."""
  results = {}
  for evaluator in evaluators:
    spec = evaluator.spec
    logged = {}
    for prefix, trainable in parameter_sets(state).items():
      metrics = evaluate(evaluator, fns, objective, trainable, frozen)
      logged.update({spec.key(prefix, m): metrics[m] for m in (spec.metrics or metrics)})
    results[spec.name or 'eval'] = logged
  return results


def line(step: int, metrics: Mapping[str, float]) -> str:
  return f'step {step} | ' + ' | '.join(f'{k} {v:.6g}' for k, v in metrics.items())
