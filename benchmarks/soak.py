r"""Soak test of exact resume: kill -9 a training run at random moments, then check it ends bitwise equal.

  python -m benchmarks.soak --kills=20 --workdir=/tmp/soak

Trains the digits ViT (configs/vit_digits.py, shrunk) once without interruption, and once more under a killer
that sends SIGKILL `--kills` times, restarting the same command after each kill, as a pod's restart loop would.
The moments are drawn at random (seeded by --seed) from three kinds:

  start-up  a random time before the first step (imports, compilation, the workdir lock, the restore);
  save      the moment an asynchronous checkpoint save is in flight (its temporary directory exists);
  step      a random step a little past the resumed one, a few milliseconds after its progress line.

After the last kill the run is completed, and its metrics (train/ and eval/ keys, every step once, in order)
and final parameters must equal the uninterrupted run's bit for bit. Prints one line per kill and a summary;
exits 1 on any difference. tests/benchmarks/test_soak.py runs a short version (a few kills) in CI.
"""
import dataclasses
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ('step', 'start-up', 'save')  # A step kill first: it measures the start-up time.
# The shrunk run: ~0.1 s of compute per step on 2 cores, a checkpoint every 10 steps.
RUN_FLAGS = ('--config.model.width=32', '--config.model.depth=2', '--config.model.mlp_dim=64',
             '--config.batch_size=32', '--config.eval_batch_size=120', '--config.log_every_steps=1',
             '--config.eval_every_steps=50', '--config.checkpoint_every_steps=10',
             '--config.schedule.warmup_steps=10')


@dataclasses.dataclass
class Outcome:
  kills: dict[str, int]            # kind -> number of kills of that kind
  restarts: int                    # process starts of the killed run, the final one included
  unreadable: int                  # checkpoint steps a restart moved aside as unreadable
  equal: bool
  difference: str = ''


def _command(workdir, data_dir, total_steps):
  return [sys.executable, '-m', 'train', '--config=configs/vit_digits.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', f'--config.total_steps={total_steps}', *RUN_FLAGS]


def _env(cache_dir):
  # One CPU device, and XLA's persistent cache so that restarts do not recompile (same executable, same bits).
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1', JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _temporary_dirs(checkpoints: str) -> set[tuple[str, int]]:
  """(name, inode) of the temporary step directories orbax writes a save into before renaming it."""
  try:
    return {(e.name, e.inode()) for e in os.scandir(checkpoints) if 'tmp' in e.name}
  except FileNotFoundError:
    return set()


class _Progress:
  """The step lines ('step K/TOTAL | ...', one per step at log_every_steps=1) of a run's stdout, read raw."""

  def __init__(self, proc):
    self.fd, self.buffer = proc.stdout.fileno(), b''

  def next_step(self, timeout: float) -> int | None:
    """The next step line's K within `timeout` seconds; None when none came (or the run ended)."""
    deadline = time.time() + timeout
    while True:
      line, newline, rest = self.buffer.partition(b'\n')
      if newline:
        self.buffer = rest
        words = line.split()
        if line.startswith(b'step ') and len(words) > 1 and b'/' in words[1]:
          return int(words[1].split(b'/')[0])
        continue
      left = deadline - time.time()
      if left <= 0 or not select.select([self.fd], [], [], left)[0]:
        return None
      chunk = os.read(self.fd, 65536)
      if not chunk:
        return None
      self.buffer += chunk


def _kill_once(command, env, workdir, kind, rng, startup_s, total_steps,
               timeout_s=600) -> tuple[bool, float | None]:
  """Starts the run and SIGKILLs it at a moment of `kind`: (False if it finished first, the seconds to its
  first step when seen)."""
  stdout = subprocess.PIPE if kind != 'save' else subprocess.DEVNULL  # An unread pipe would fill and stall it.
  stderr = open(os.path.join(os.path.dirname(workdir), 'stderr.txt'), 'w')
  checkpoints = os.path.join(workdir, 'checkpoints')
  stale = _temporary_dirs(checkpoints)  # Left by an earlier kill: not a save of this run.
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
  started, first_step_s = time.time(), None
  try:
    if kind == 'start-up':
      # Anywhere before the first step: a random time, cut short by the first step line (a cached compilation
      # makes a restart faster than the start-up that was measured).
      _Progress(proc).next_step(rng.uniform(0.0, startup_s))
    elif kind == 'save':
      while not _temporary_dirs(checkpoints) - stale:
        if proc.poll() is not None or time.time() > started + timeout_s:
          return False, None
        time.sleep(0.002)
    else:
      progress = _Progress(proc)
      step = progress.next_step(timeout_s)
      if step is not None:
        first_step_s = time.time() - started
        target = min(step + rng.randint(0, 25), total_steps - 1)
        while step is not None and step < target:
          step = progress.next_step(timeout_s)
        time.sleep(rng.uniform(0.0, 0.05))
    if proc.poll() is not None:
      return False, first_step_s
    proc.send_signal(signal.SIGKILL)
    return True, first_step_s
  finally:
    proc.kill()
    proc.wait()
    stderr.close()
    if proc.returncode not in (0, -signal.SIGKILL):
      with open(stderr.name) as f:
        raise RuntimeError(f'a restart exited {proc.returncode}: {f.read().strip().splitlines()[-1:]}')


def _train_metrics(workdir):
  from train import metrics as metrics_lib
  return [{k: v for k, v in r.items() if k == 'step' or k.startswith(('train/', 'eval/'))}
          for r in metrics_lib.read_metrics(workdir)]


def _final_trainable(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']['trainable']


def _compare(straight, killed, total_steps) -> str:
  """'' when the killed run equals the uninterrupted one bit for bit, else what differs."""
  import jax
  import numpy as np
  a, b = _train_metrics(killed), _train_metrics(straight)
  steps = [r['step'] for r in a]
  if steps != sorted(set(steps)):
    return f'metrics.jsonl steps are duplicated or out of order: {steps}'
  if a != b:
    first = next(i for i, (x, y) in enumerate(zip(a + [None] * len(b), b + [None] * len(a))) if x != y)
    return f'metrics differ first at record {first}: {a[first] if first < len(a) else None} vs ' \
           f'{b[first] if first < len(b) else None}'
  pa, pb = _final_trainable(killed, total_steps), _final_trainable(straight, total_steps)
  diffs = [jax.tree_util.keystr(path) for path, x, y in
           zip(*zip(*jax.tree_util.tree_leaves_with_path(pa)), jax.tree.leaves(pb)) if not np.array_equal(x, y)]
  return f'final parameters differ: {diffs[:3]}' if diffs else ''


def soak(root: str, kills: int, seed: int = 0, total_steps: int = 400, data_dir: str | None = None,
         log=print) -> Outcome:
  """Runs the soak under `root` (emptied first); see the module docstring."""
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  if data_dir is None:  # Prepared here, once, so that neither run builds it while being timed or killed.
    import tensorflow_datasets as tfds
    from data import pipeline
    tfds.disable_progress_bar()
    data_dir = os.path.join(root, 'tfds')
    pipeline.get_source('digits', 'train', data_dir)
  straight, killed = os.path.join(root, 'straight'), os.path.join(root, 'killed')
  env = _env(os.path.join(root, 'xla_cache'))
  # The uninterrupted run goes alongside (one core each), with a compilation cache of its own.
  reference_log = open(os.path.join(root, 'reference_stderr.txt'), 'w')
  reference = subprocess.Popen(_command(straight, data_dir, total_steps), cwd=REPO,
                               env=_env(os.path.join(root, 'xla_cache_reference')),
                               stdout=subprocess.DEVNULL, stderr=reference_log, text=True)
  rng = random.Random(seed)
  counts, restarts, attempts = dict.fromkeys(KINDS, 0), 0, 0
  startup_s = 10.0  # Until a step kill has measured it: start-up kills land anywhere before the first step.
  command = _command(killed, data_dir, total_steps)
  while sum(counts.values()) < kills:
    kind = KINDS[sum(counts.values()) % len(KINDS)] if attempts < len(KINDS) else rng.choice(KINDS)
    attempts += 1
    restarts += 1
    done, first_step_s = _kill_once(command, env, killed, kind, rng, startup_s, total_steps)
    if first_step_s is not None:
      startup_s = first_step_s
    if not done:
      reference.kill()
      raise RuntimeError(f'the run finished after {sum(counts.values())} of {kills} kills; raise total_steps '
                         f'(now {total_steps}).')
    counts[kind] += 1
    log(f'kill {sum(counts.values())}/{kills}: {kind}')
  reference.wait()
  reference_log.close()
  if reference.returncode != 0:
    with open(reference_log.name) as f:
      raise RuntimeError(f'the uninterrupted run exited {reference.returncode}: {f.read().strip()[-500:]}')
  final = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  restarts += 1
  if final.returncode != 0:
    return Outcome(counts, restarts, 0, False, f'the final restart exited {final.returncode}: '
                   f'{final.stderr.strip().splitlines()[-1:]}')
  aside = os.path.join(killed, 'checkpoints.unreadable')
  unreadable = len(os.listdir(aside)) if os.path.isdir(aside) else 0
  difference = _compare(straight, killed, total_steps)
  return Outcome(counts, restarts, unreadable, not difference, difference)


_KILLS = flags.DEFINE_integer('kills', 20, 'SIGKILLs to send.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/soak', 'Scratch directory (emptied first).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill moments.')
_STEPS = flags.DEFINE_integer('total_steps', 400, 'Length of the run (long enough that it outlives the kills).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # The comparison restores checkpoints; orbax narrates that at INFO.
  start = time.time()
  out = soak(_WORKDIR.value, _KILLS.value, _SEED.value, _STEPS.value)
  kinds = ', '.join(f'{n} {kind}' for kind, n in out.kills.items())
  print(f'{sum(out.kills.values())} kills ({kinds}), {out.restarts} starts, {out.unreadable} unreadable '
        f'checkpoints moved aside, {time.time() - start:.0f} s: '
        + ('bitwise equal to the uninterrupted run' if out.equal else f'DIFFERENT: {out.difference}'))
  sys.exit(0 if out.equal else 1)


if __name__ == '__main__':
  app.run(main)
