"""What a run holds on each device, found without allocating it: `python -m train --config=... --dry_run`.

The run's own programs are built for the config's mesh on the devices present (on a CPU, `JAX_NUM_CPU_DEVICES=8`
stands in for a v5e-8's chips or a v4-8's cores), the train step is lowered and compiled for abstract
arguments (shapes, dtypes and shardings; no array exists and no data is read), and the bytes on one device are
added up from the shardings:

  trainable   the parameters the step differentiates (LoRA: its factors)
  optimizer   their optimizer state (and EMA when kept)
  frozen      the adapter's base (QLoRA: NF4 codes and their scales) and the frozen trees the objective reads
  batch       the device's rows of the global batch
  temporaries XLA's buffer assignment for the compiled step (activations, gradients, the optimizer's update)

The temporaries are the compiler's own figure for this backend: XLA:CPU keeps some bf16 work in f32 and fuses
less than XLA:TPU, so on a TPU they come out lower; parameters, state and batch are exact for any backend.
"""
import dataclasses
import math
import time

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from train import adapters, checkpoint, compute, loop, objectives, sharding, steps
from train import metrics
from train import state as state_lib

GIB = 1024 ** 3
# Memory of one JAX device (a chip; a v4 or v5p chip's two cores are one megacore device), for the fraction used.
DEVICE_BYTES = {'tpu_v4': 32 * GIB, 'tpu_v5e': 16 * GIB, 'tpu_v5p': 95 * GIB, 'tpu_v6e': 32 * GIB,
                'h100': 80 * GIB}


@dataclasses.dataclass
class Accounting:
  devices: int
  mesh: dict[str, int]
  params: int                 # the model's parameter elements
  trainable_params: int
  per_device: dict[str, int]  # bytes on one device: trainable, optimizer, frozen, batch, temporaries
  largest: list[tuple[str, int, str]]  # the largest arrays on one device: (name, bytes, shape and sharding)
  compile_s: float = 0.0

  @property
  def total(self) -> int:
    return sum(self.per_device.values())


def input_shape(config, objective) -> tuple[int, ...]:
  """One example's shape from the config alone (no data read): config.study.input_shape, data.seq_len (or
  max_length) for token rows, else the image size of the last crop or resize of data.pp_train."""
  study = config.get('study') or {}
  if study.get('input_shape'):
    return tuple(study['input_shape'])
  data = config.data
  length = data.get('seq_len') or data.get('max_length')  # token rows (a preference pair's rows: max_length)
  if length:
    return objective.example_shape(0, 0, int(length))
  size = compute.pp_image_size(str(data.get('pp_train') or ''))
  if size is None:
    raise ValueError('cannot tell the input shape from the config; set config.study.input_shape, e.g. (224, 224, 3).')
  return objective.example_shape(size, 3, 0)


def _leaf_bytes(leaf) -> int:
  """Bytes on one device of an abstract array with a sharding."""
  return math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _device_bytes(tree) -> int:
  return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(tree))


def _arrays(trees: dict) -> list[tuple[str, int, str]]:
  """(name, bytes on one device, dtype, shape and partitioning) of every array of `trees`."""
  found = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(trees):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
    spec = tuple(leaf.sharding.spec) if hasattr(leaf.sharding, 'spec') else ()
    found.append((name, _leaf_bytes(leaf), f'{leaf.dtype}{list(leaf.shape)} over {spec}'))
  return found


@dataclasses.dataclass
class Programs:
  """A config's programs built for its mesh, with abstract arguments of the train step (shapes, dtypes and
  shardings; no array exists): what `account` compiles, and train.study.prewarm ahead of a run."""
  config: object
  mesh: object
  rules: object
  objective: object
  fns: steps.Steps
  state: dict
  frozen: dict
  batch: dict
  learning_rate: jax.ShapeDtypeStruct
  sources: dict

  def lower_train(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fns.train.lower(self.state, self.frozen, self.batch, self.learning_rate)


def programs(config, devices=None) -> Programs:
  """Builds `config`'s programs on `devices` (default: all) and the train step's abstract arguments."""
  devices = jax.devices() if devices is None else list(devices)
  if config.total_steps <= 0:  # Set by a budget from the data; the programs do not depend on it.
    config = config.copy_and_resolve_references()
    config.total_steps = 1
  loop.check_config(config, len(devices), jax.process_count())
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.sharding_rules)
  objective = objectives.make_objective(config.task)
  adapter = adapters.make_adapter(config.get('adapter'))
  sources = loop.frozen_sources(config, objective)
  one = objective.synthetic_batch(config, 1, input_shape(config, objective))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps.build(config, mesh, rules, loop.build_model(config), objective, adapter,
                      objective.example_input(one), frozen_names=tuple(sources))
    state = checkpoint.abstract_with_shardings(fns.abstract_state, fns.state_shardings)
    params = checkpoint.abstract_with_shardings(fns.abstract_params, fns.param_shardings)
    frozen = {name: params for name in sources}
    if state_lib.BASE in fns.frozen_shardings:
      _, frozen[state_lib.BASE] = jax.eval_shape(fns.split, params)
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype, sharding=fns.batch_sharding)
           for k, v in one.items()}
  learning_rate = jax.ShapeDtypeStruct((), fns.learning_rates.dtype, sharding=NamedSharding(mesh, P()))
  return Programs(config, mesh, rules, objective, fns, state, frozen, batch, learning_rate, sources)


def account(config, devices=None) -> Accounting:
  """Builds `config`'s programs on `devices` (default: all) and returns the bytes one device holds."""
  p = programs(config, devices)
  fns, state, frozen, batch = p.fns, p.state, p.frozen, p.batch
  optimizer = {k: v for k, v in state.items() if k in ('opt_state', 'ema')}
  arrays = _arrays({'trainable': state['trainable'], 'optimizer': optimizer, 'frozen': frozen})
  started = time.perf_counter()
  compiled = p.lower_train().compile()
  compile_s = time.perf_counter() - started
  stats = compiled.memory_analysis()
  return Accounting(
      devices=p.mesh.size, mesh=dict(p.mesh.shape), params=adapters.num_elements(fns.abstract_params),
      trainable_params=adapters.num_elements(fns.abstract_state['trainable']),
      per_device={'trainable': _device_bytes(state['trainable']), 'optimizer': _device_bytes(optimizer),
                  'frozen': _device_bytes(frozen), 'batch': _device_bytes(batch),
                  'temporaries': int(stats.temp_size_in_bytes)},
      largest=sorted(arrays, key=lambda a: -a[1])[:5],
      compile_s=compile_s)


def report(accounting: Accounting, hardware: str | None = None) -> str:
  """The accounting as lines: the bytes per device of each part and their sum (against `hardware`'s memory)."""
  a = accounting
  axes = sharding.mesh_text(a.mesh)
  lines = [f'dry run: {a.devices} devices | mesh {axes} | {a.params:,} parameters ({a.trainable_params:,} '
           f'trainable) | train step compiled in {a.compile_s:.1f} s, nothing allocated',
           'bytes per device:']
  for name, n in (*a.per_device.items(), ('total', a.total)):
    lines.append(f'  {name:<12} {metrics.size_text(n):>11}')
  lines.append('largest arrays per device:')
  lines += [f'  {metrics.size_text(n):>11}  {name}  {what}' for name, n, what in a.largest]
  if hardware:
    if hardware not in DEVICE_BYTES:
      raise ValueError(f'--hardware={hardware!r} is unknown; choose one of {sorted(DEVICE_BYTES)}.')
    capacity = DEVICE_BYTES[hardware]
    verdict = 'fits' if a.total <= capacity else 'does NOT fit: shard wider, use microbatches or remat'
    lines.append(f'  of one {hardware} device ({capacity / GIB:.0f} GiB): {100 * a.total / capacity:.0f}%, {verdict}')
  return '\n'.join(lines)
