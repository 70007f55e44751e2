"""Compute accounting: analytic training FLOPs, hardware peaks, core-hours, utilisation and budgets.

Training FLOPs per example are what the run's objective says they cost given the model's analytic forward
FLOPs, `models.<model_name>.forward_flops(model_kwargs, input_shape)`, and the adapter's trainable share of the
parameters: 3 x forward for plain training (a forward, and a backward pass of twice the forward). SAM
(`optimizer.sam_rho` > 0) pays for the objective's whole training cost twice: the gradient at the ascent point is a
second full forward and backward over the same batch. A core is what a budget is
counted in: a TensorCore on TPUs (a v4 or v5p chip has two and shows up in JAX as one device), a whole GPU,
and one JAX device on CPU.

`config.budget` fixes a run's length (it overrides `total_steps`), in one of two ways:
  {core_hours, hardware, mfu}: the steps that core_hours of `hardware` pay for at utilisation `mfu`,
      steps = floor(core_hours * 3600 * peak_per_core * mfu / (train_flops_per_example * batch_size));
  {epochs}: steps = ceil(epochs * num_train_examples / batch_size); `hardware` and `mfu` are optional and
      only give the printed estimate of the cost.
"""
import functools
import math
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from train import adapters, build, objectives

# Dense bf16 peak FLOP/s per core, from the vendors' spec sheets (per chip: v4 275T, v5e 197T, v5p 459T,
# v6e 918T; H100 SXM 989T without sparsity). 'cpu' is measured at start (float32 matmul).
PEAK_FLOPS: dict[str, float | None] = {'tpu_v4': 137.5e12, 'tpu_v5e': 197e12, 'tpu_v5p': 229.5e12,
                                       'tpu_v6e': 918e12, 'h100': 989e12, 'cpu': None}
CORES_PER_DEVICE: dict[str, int] = {'tpu_v4': 2, 'tpu_v5e': 1, 'tpu_v5p': 2, 'tpu_v6e': 1, 'h100': 1, 'cpu': 1}
BUDGET_FIELDS = ('core_hours', 'epochs', 'hardware', 'mfu')
# JAX device_kind (lower case) prefix -> hardware; longer prefixes first ('tpu v5 lite' before 'tpu v5').
_DEVICE_KINDS = (('tpu v5 lite', 'tpu_v5e'), ('tpu v5e', 'tpu_v5e'), ('tpu v5p', 'tpu_v5p'), ('tpu v5', 'tpu_v5p'),
                 ('tpu v6 lite', 'tpu_v6e'), ('tpu v6e', 'tpu_v6e'), ('tpu v4', 'tpu_v4'), ('nvidia h100', 'h100'))


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """float32 FLOP/s of a jitted n x n matmul on one device: the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


@functools.cache
def _cpu_peak_flops() -> float:
  return matmul_peak_flops(1024, 5)  # As fast as 2048 on CPU (within a few %), in a tenth of the time.


def _check_hardware(hardware: str, field: str = 'budget.hardware') -> None:
  if hardware not in PEAK_FLOPS:
    raise ValueError(f'{field}={hardware!r} is unknown; choose one of {sorted(PEAK_FLOPS)}.')


def peak_flops(hardware: str) -> float:
  """Peak FLOP/s of one core of `hardware` ('cpu': measured once per process)."""
  _check_hardware(hardware)
  return PEAK_FLOPS[hardware] or _cpu_peak_flops()


def detect_hardware(device) -> str | None:
  """The PEAK_FLOPS name of a JAX device, or None when the table has no such device."""
  if device.platform == 'cpu':
    return 'cpu'
  kind = device.device_kind.lower()
  return next((name for prefix, name in _DEVICE_KINDS if kind.startswith(prefix)), None)


# The last resizing or cropping op of a preprocessing string fixes the training resolution.
_PP_SIZE = re.compile(r'(?:inception_crop|random_crop|central_crop|resize_small|resize)\((\d+)')


def pp_image_size(pp: str) -> int | None:
  """N of the last crop or resize op of a preprocessing string (the training resolution), or None."""
  sizes = _PP_SIZE.findall(pp)
  return int(sizes[-1]) if sizes else None


def run_hardware(config, devices) -> str | None:
  """What a run's core-hours and utilisation count in: budget.hardware if set, else the devices' own."""
  return (config.get('budget') or {}).get('hardware') or detect_hardware(devices[0])


def core_hours(num_devices: int, seconds: float, hardware: str | None) -> float:
  """devices x cores per device x hours (a device of unknown hardware counts as one core)."""
  return num_devices * CORES_PER_DEVICE.get(hardware, 1) * seconds / 3600.0


def utilisation(flops: float, used_core_hours: float, hardware: str) -> float:
  """Achieved fraction of the peak: FLOPs done / (core-seconds x peak per core)."""
  return flops / max(used_core_hours * 3600.0 * peak_flops(hardware), 1e-30)


def estimated_core_hours(flops: float, hardware: str, mfu: float = 1.0) -> float:
  """Core-hours that `flops` take on `hardware` at utilisation `mfu`."""
  return flops / (peak_flops(hardware) * mfu) / 3600.0


def trainable_fraction(config, input_shape: tuple[int, ...]) -> float:
  """The share of the model's parameters that config.adapter trains (1 without an adapter); abstract, no memory."""
  adapter = adapters.make_adapter(config.get('adapter'))
  if isinstance(adapter, adapters.NoAdapter):
    return 1.0
  objective = objectives.make_objective(config.task)
  example = objective.example_input(objective.synthetic_batch(config, 1, tuple(input_shape)))
  model = adapter.wrap(build.build_model(config))
  boxed = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, example)['params'])
  return adapters.trainable_fraction(adapter, boxed)


def gradient_passes(config) -> int:
  """Forward-and-backward passes per step over the batch: 2 with SAM (optimizer.sam_rho > 0), else 1."""
  return 2 if (config.get('optimizer') or {}).get('sam_rho') else 1


def train_flops_per_example(config, input_shape: tuple[int, ...], fraction: float | None = None) -> float:
  """The objective's training FLOPs of one example of `input_shape` (no batch axis), from the model's analytic
  forward FLOPs and the adapter's trainable share of the parameters (`fraction`; computed when None), times the
  step's passes over the batch (`gradient_passes`)."""
  module = build.model_module(config)
  if not hasattr(module, 'forward_flops'):
    raise ValueError(f'models.{config.model_name} has no forward_flops(model_kwargs, input_shape); add one '
                     'for compute accounting.')
  objective = objectives.make_objective(config.task)
  forward = module.forward_flops(build.model_kwargs(config), tuple(input_shape))
  if fraction is None:
    fraction = trainable_fraction(config, input_shape)
  return gradient_passes(config) * objective.train_flops_per_example(forward, fraction)


def measured_train_flops(lowered_step, config) -> float | None:
  """Training FLOPs per example from XLA's cost analysis of the lowered train step, or None if not comparable.

  The lowered (not yet partitioned) program is the whole global batch; a compiled one would count a
  single device's share. XLA counts the body of a loop once, so a scanned model (config.model.scan)
  gives None rather than a figure short by a factor of its depth.
  """
  if config.model.get('scan'):
    return None
  cost = lowered_step.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) / config.batch_size


def _flop(x: float) -> str:
  """1.23e9 -> '1.23 GFLOP'."""
  exponent = min(max(int(math.floor(math.log10(max(abs(x), 1.0)))) // 3, 0), 6)
  return f'{x / 1000**exponent:.3g} {" kMGTPE"[exponent].strip()}FLOP'


def flops_line(flops_per_example: float, xla_flops_per_example: float | None) -> str:
  """The analytic and XLA-measured training FLOPs per example, for the start of a run."""
  xla = ('XLA n/a (the model is scanned and XLA counts a loop body once)' if xla_flops_per_example is None else
         f'XLA {_flop(xla_flops_per_example)} (x{xla_flops_per_example / flops_per_example:.3f})')
  return f'compute: {_flop(flops_per_example)}/example (train, analytic) | {xla}'


def progress_metrics(train_flops: float, used_core_hours: float, hardware: str | None) -> dict[str, float]:
  """compute/train_flops, and compute/mfu where the hardware's peak is known."""
  metrics = {'compute/train_flops': train_flops}
  if hardware is not None:
    metrics['compute/mfu'] = utilisation(train_flops, used_core_hours, hardware)
  return metrics


def _budget(config) -> dict[str, Any]:
  """config.budget as a dict without None fields, validated."""
  raw = config.get('budget')
  budget = raw.to_dict() if hasattr(raw, 'to_dict') else dict(raw or {})
  unknown = sorted(set(budget) - set(BUDGET_FIELDS))
  if unknown:
    raise ValueError(f'budget has unknown fields {unknown}; it takes {list(BUDGET_FIELDS)}.')
  budget = {k: v for k, v in budget.items() if v is not None}
  kinds = [k for k in ('core_hours', 'epochs') if k in budget]
  if len(kinds) != 1:
    found = 'both core_hours and epochs' if kinds else 'neither core_hours nor epochs'
    raise ValueError(f'budget sets {found}; set exactly one: budget.core_hours (with budget.hardware and '
                     'budget.mfu) or budget.epochs.')
  if not budget[kinds[0]] > 0:
    raise ValueError(f'budget.{kinds[0]}={budget[kinds[0]]!r} must be positive.')
  if 'core_hours' in budget:
    needs = {'hardware': f'one of {sorted(PEAK_FLOPS)}', 'mfu': 'the expected utilisation, e.g. 0.35'}
    for field, what in needs.items():
      if field not in budget:
        raise ValueError(f'budget.core_hours needs budget.{field}, {what}.')
  if 'hardware' in budget:
    _check_hardware(budget['hardware'])
  if 'mfu' in budget and not 0 < budget['mfu'] <= 1:
    raise ValueError(f'budget.mfu={budget["mfu"]!r} must be in (0, 1], a fraction of the peak (e.g. 0.35).')
  return budget


def resolve_budget(config, *, num_train_examples: int | None, input_shape: tuple[int, ...],
                   flops_per_example: float | None = None) -> int:
  """total_steps that config.budget buys (see the module docstring); ValueError on a bad budget."""
  budget = _budget(config)
  if 'epochs' in budget:
    if not num_train_examples:
      raise ValueError('budget.epochs needs the number of training examples, which this data config does not '
                       'give; use budget.core_hours instead.')
    steps = budget['epochs'] * num_train_examples / config.batch_size
    return max(1, math.ceil(steps - 1e-9))  # An epochs value rounded in float still gives its whole steps.
  affordable = budget['core_hours'] * 3600.0 * peak_flops(budget['hardware']) * budget['mfu']
  flops_per_example = flops_per_example or train_flops_per_example(config, input_shape)
  return max(1, math.floor(affordable / (flops_per_example * config.batch_size)))


def budget_summary(config, total_steps: int, *, num_train_examples: int | None, flops_per_example: float,
                   hardware: str | None) -> str:
  """One line: what the budget buys, the analytic FLOPs and the cost estimate (at `hardware` if the budget
  names none)."""
  budget = _budget(config)
  b = config.batch_size
  examples = total_steps * b
  epochs = num_train_examples and f'{examples / num_train_examples:.3g} epochs of {num_train_examples} examples'
  flops = f'analytic {_flop(flops_per_example)}/example (train)'
  if 'core_hours' in budget:
    bought = f'budget: {budget["core_hours"]:g} core-hours on {budget["hardware"]} at mfu {budget["mfu"]:g}'
    return ' | '.join([f'{bought} = {total_steps} steps of batch {b}' + (f' ({epochs})' if epochs else ''), flops])
  line = f'budget: {budget["epochs"]:g} epochs of {num_train_examples} examples = {total_steps} steps of batch {b}'
  hardware, mfu = budget.get('hardware', hardware), budget.get('mfu', 1.0)
  parts = [line, flops]
  if hardware is not None:
    cost = estimated_core_hours(examples * flops_per_example, hardware, mfu)
    parts.append(f'est. {cost:.3g} core-hours on {hardware} at mfu {mfu:g}')
  return ' | '.join(parts)
