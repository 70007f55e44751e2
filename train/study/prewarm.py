"""Compiles a sweep's train steps ahead of their runs, in a background process, into the persistent cache.

A CPU study spends most of its wall time compiling, not training: the main job's eight distinct train steps
(four models, pretraining and finetuning) took 71 of its 240 s to compile, one after another, each while the
runs waited. The runs of one program differ only in inputs (the learning rate, the step count), so
train.sweep compiles each program once through XLA's persistent cache; this module compiles the programs the
sweep will reach later while it trains the earlier ones, so that a run finds its step in the cache.

  python -m train.study.prewarm --plan=FILE.json   (started by train.sweep; the plan lists (spec, overrides))

Each program is compiled as `python -m train --dry_run` compiles it (train.memory: abstract arguments with
the run's shardings), which lowers to the same module as the run, so the cache keys agree. The process writes
CACHE/prewarm/<key>.started before compiling a program and <key>.done after, and `wait_for` lets a run wait
for a program already being compiled rather than compile it a second time. It only ever adds cache entries: a
run never depends on it (a failed or slow prewarm leaves a run to compile its step itself), and it exits when
its parent does. CPU only: on an accelerator the devices belong to the run's process.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

MARKERS = 'prewarm'
# Config fields that reach the train step only as inputs or not at all (the learning-rate table is computed
# outside the step; the budget and study blocks only set total_steps and label the run).
_NOT_IN_PROGRAM = ('total_steps', 'budget', 'study', 'init_params', 'schedule')


def program_key(config) -> str:
  """A name for the train step a config compiles to: runs with equal keys share one compiled step. A key too
  fine costs a redundant compile in the background; one too coarse lets a run compile its own step."""
  fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_PROGRAM}
  text = json.dumps(fields, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def distinct(runs) -> list:
  """The first run of each program, in the order the sweep reaches them."""
  seen, firsts = set(), []
  for run in runs:
    key = program_key(run.config)
    if key not in seen:
      seen.add(key)
      firsts.append(run)
  return firsts


def enabled() -> bool:
  """Prewarming helps where compiling and training can share a host: one process on the CPU backend."""
  import jax
  cache = jax.config.jax_compilation_cache_dir
  # A local cache only: the markers are local files (a gs:// workdir's cache is left to the runs themselves).
  return jax.default_backend() == 'cpu' and jax.process_count() == 1 and bool(cache) and '://' not in str(cache)


def start(runs, cache_dir: str) -> subprocess.Popen | None:
  """Starts compiling the programs of `runs` after the first (which the sweep compiles itself at once) in a
  background process; None when nothing is left to compile or prewarming does not apply here."""
  import jax
  pending = [r for r in distinct(runs)[1:] if not os.path.exists(_marker(cache_dir, r.config, 'done'))]
  if not pending or not enabled():
    return None
  os.makedirs(os.path.join(cache_dir, MARKERS), exist_ok=True)
  plan = os.path.join(cache_dir, MARKERS, f'plan-{os.getpid()}.json')
  with open(plan, 'w') as f:
    json.dump([[r.spec, list(r.overrides)] for r in pending], f)
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(len(jax.devices())),
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(jax.config.jax_persistent_cache_min_compile_time_secs))
  with open(os.path.join(cache_dir, MARKERS, 'prewarm.log'), 'a') as log:
    return subprocess.Popen([sys.executable, '-m', 'train.study.prewarm', f'--plan={plan}'], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(config, cache_dir: str, process: subprocess.Popen | None, timeout_s: float = 600) -> float:
  """Waits while the background process compiles `config`'s program (started, not done); returns the seconds
  waited. A run whose program was not started compiles it itself, as it would without prewarming."""
  if process is None:
    return 0.0
  started = time.perf_counter()
  while (os.path.exists(_marker(cache_dir, config, 'started')) and
         not os.path.exists(_marker(cache_dir, config, 'done')) and process.poll() is None and
         time.perf_counter() - started < timeout_s):
    time.sleep(0.05)
  return time.perf_counter() - started


def stop(process: subprocess.Popen | None) -> None:
  if process is not None and process.poll() is None:
    process.kill()
    process.wait()


def compile_programs(config) -> list[str]:
  """Compiles what a run of `config` compiles at its start, as the loop calls it: the train step, the seeded
  init (a run without init_params) and the eval step at each evaluator's batch shape (read from its data, as
  the run does). Returns their names."""
  import flax.linen as nn
  import jax
  from train import evaluation, memory, sharding
  p = memory.programs(config)
  fns, names = p.fns, ['train']
  p.lower_train().compile()
  with jax.set_mesh(p.mesh), nn.logical_axis_rules(p.rules):
    if not (config.get('init_params') or config.get('init_params_exclude')):
      fns.init.lower(fns.init_key).compile()
      names.append('init')
    evaluators = evaluation.build(config, p.objective, global_batch_size=config.get('eval_batch_size') or
                                  config.batch_size)
    shapes = set()
    for evaluator in evaluators:
      batch = sharding.global_batch(next(iter(evaluator.batches())), fns.batch_sharding)
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
      shape = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in abstract.items()))
      if shape not in shapes:
        shapes.add(shape)
        fns.eval.lower(p.state['trainable'], p.frozen, abstract).compile()
        names.append(f'eval {evaluator.spec.name or ""}'.strip())
  return names


def _marker(cache_dir: str, config, what: str) -> str:
  return os.path.join(cache_dir, MARKERS, f'{program_key(config)}.{what}')


def _exit_with_parent() -> None:
  """Ends this process when the sweep that started it ends (killed with -9 included), even mid-compile."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)
  threading.Thread(target=watch, daemon=True).start()


def main(plan_path: str) -> None:
  _exit_with_parent()
  from train import cli
  cli.quiet_logging()
  cache_dir = os.environ['JAX_COMPILATION_CACHE_DIR']
  with open(plan_path) as f:
    plan = json.load(f)
  for spec, overrides in plan:
    config = cli.load_config(spec, [f'--config.{o}' for o in overrides])
    if os.path.exists(_marker(cache_dir, config, 'done')):
      continue
    open(_marker(cache_dir, config, 'started'), 'w').close()
    try:
      started = time.perf_counter()
      names = compile_programs(config)
      print(f'{spec} {overrides}: {", ".join(names)} compiled in {time.perf_counter() - started:.1f} s', flush=True)
    except Exception as e:  # noqa: BLE001 - the run itself reports its config's errors; this only warms a cache.
      print(f'{spec} {overrides}: not compiled ({cli.summary(e)})', flush=True)
    open(_marker(cache_dir, config, 'done'), 'w').close()


if __name__ == '__main__':
  args = [a for a in sys.argv[1:] if a.startswith('--plan=')]
  if len(args) != 1:
    sys.exit('usage: python -m train.study.prewarm --plan=FILE.json')
  main(args[0].partition('=')[2])
