"""The loop's own train step, compiled on a synthetic batch and timed: what the benchmark scripts share."""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

import flax.linen as nn
import jax

from train import adapters, loop, objectives, profiling, sharding, steps
from train import state as state_lib


@dataclasses.dataclass
class CompiledStep:
  compiled: Any        # the jitted train step, compiled for these arguments
  args: list           # [state, frozen, global batch, learning rate]

  def time(self, repeats: int, profile_dir: str | None = None) -> float:
    """Median seconds of `repeats` steps after one warm-up step (the state is carried from step to step).

    profile_dir: a jax.profiler trace of the timed steps is written there (TensorBoard's profile plugin,
    perfetto_trace.json.gz for Perfetto); tracing slows the steps a little.
    """
    profiler = profiling.StepProfiler((1, repeats + 1), profile_dir or '', enabled=bool(profile_dir))
    times = []
    try:
      for i in range(repeats + 1):
        profiler.before_step(i)
        start = time.perf_counter()
        with profiler.annotate(i):
          self.args[0], metrics = self.compiled(*self.args)
          jax.block_until_ready(metrics)
        if i:
          times.append(time.perf_counter() - start)
        profiler.after_step(i + 1, metrics)
    finally:
      profiler.close()
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


def time_peer(job: dict, batch: dict, repeats: int) -> dict:
  """Times the PyTorch side of `job` (see benchmarks/torch_peer.py) in a fresh process on `batch`.

  Never in this process: a process that has run JAX times torch 1.1-2.3x slower than a fresh one here
  (thread pools and allocators of both runtimes compete). Returns the peer's JSON: times, median.
  """
  with tempfile.TemporaryDirectory() as tmp:
    np.savez(os.path.join(tmp, 'batch.npz'), **{k: np.asarray(v) for k, v in batch.items()})
    job = {**job, 'batch': os.path.join(tmp, 'batch.npz'), 'repeats': repeats}
    with open(os.path.join(tmp, 'job.json'), 'w') as f:
      json.dump(job, f)
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.torch_peer', os.path.join(tmp, 'job.json')],
                          capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f'error: the torch peer {job["spec"]} failed (exit {proc.returncode}): '
                     f'{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"}')
  return json.loads(proc.stdout.strip().splitlines()[-1])
