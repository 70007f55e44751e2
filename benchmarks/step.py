"""The loop's own train step, compiled on a synthetic batch and timed: what the benchmark scripts share."""
import dataclasses
import statistics
import time
from typing import Any

import flax.linen as nn
import jax

from train import adapters, loop, objectives, sharding, steps
from train import state as state_lib


@dataclasses.dataclass
class CompiledStep:
  compiled: Any        # the jitted train step, compiled for these arguments
  args: list           # [state, frozen, global batch, learning rate]

  def time(self, repeats: int) -> float:
    """Median seconds of `repeats` steps after one warm-up step (the state is carried from step to step)."""
    times = []
    for i in range(repeats + 1):
      start = time.perf_counter()
      self.args[0], metrics = self.compiled(*self.args)
      jax.block_until_ready(metrics)
      if i:
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_step(config, batch, devices) -> CompiledStep:
  """`config`'s train step on `devices` (the mesh's data axis), compiled for `batch` (a local numpy batch)."""
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = len(devices), 1, 1
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.sharding_rules)
  objective = objectives.make_objective(config.task)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps.build(config, mesh, rules, loop.build_model(config), objective,
                      adapters.make_adapter(config.get('adapter')), objective.example_input(batch))
    state, base = fns.init(fns.init_key)
    args = [state, {state_lib.BASE: base} if base else {},
            sharding.global_batch(batch, fns.batch_sharding), fns.learning_rates[0]]
    return CompiledStep(fns.train.lower(*args).compile(), args)
