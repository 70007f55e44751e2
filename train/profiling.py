"""Profiler traces of chosen training steps (config.profile_steps), for TensorBoard's profile plugin and Perfetto.

profile_steps=[START, STOP] traces the steps that start at step START..STOP-1 (the updates that take the state
from step START to step STOP: metrics.jsonl's lines START+1..STOP) with jax.profiler, into DIR (the loop's
WORKDIR/profile): plugins/profile/RUN/HOST.xplane.pb (`tensorboard --logdir=WORKDIR/profile`, or XProf) and
perfetto_trace.json.gz beside it (ui.perfetto.dev). The trace starts before the first traced step fetches its
batch and stops once the last one's outputs are ready, so it holds whole steps, each marked by a
StepTraceAnnotation; a run resumed inside the window traces the rest of it. Process 0 traces its own host.
"""
import numbers
import os
import shutil
import sys
import tempfile

from etils import epath
import jax

from train import paths


def parse_steps(value) -> tuple[int, int] | None:
  """(START, STOP) of config.profile_steps; None when it is off (None or empty). ValueError with one line
  when it is not two integers with 0 <= START < STOP."""
  if value is None or (isinstance(value, (tuple, list)) and all(v is None for v in value)):
    return None  # `--config.profile_steps=None` arrives as (None,).
  if not (isinstance(value, (tuple, list)) and len(value) == 2 and
          all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value) and 0 <= value[0] < value[1]):
    shown = tuple(value) if isinstance(value, (tuple, list)) else value
    raise ValueError(f'profile_steps={shown!r} is not two integers START, STOP with 0 <= START < STOP; e.g. '
                     '--config.profile_steps=10,15 traces steps 10 to 14 (None: no trace).')
  return int(value[0]), int(value[1])


class StepProfiler:
  """Called by the loop around each step: before_step(step) at its start, annotate(step) around its
  computation, after_step(step + 1, outputs) once it is dispatched; close() when the loop ends, also early."""

  def __init__(self, profile_steps, directory: str, enabled: bool = True, stream=None):
    self.window = parse_steps(profile_steps)
    self.directory = directory
    self.enabled = enabled and self.window is not None
    self.stream = stream or sys.stdout
    self._local = None  # Where the running trace goes; None when none runs.
    self._first = None
    self._done = False

  def before_step(self, step: int) -> None:
    if not self.enabled or self._done or self._local is not None:
      return
    start, stop = self.window
    if start <= step < stop:
      # The Perfetto file is written with pathlib: a gs:// trace is made locally and copied up at the end.
      self._local = tempfile.mkdtemp(prefix='profile_') if paths.is_url(self.directory) else self.directory
      self._first = step
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)

  @staticmethod
  def annotate(step: int):
    """The step's span in a trace (also in one taken on demand through jax.profiler.start_server)."""
    return jax.profiler.StepTraceAnnotation('train', step_num=step)

  def after_step(self, step: int, outputs) -> None:
    """`step`: the state's step after the update whose `outputs` are given; ends the trace at the window's end."""
    if self._local is not None and step >= self.window[1]:
      jax.block_until_ready(outputs)  # Dispatch is asynchronous: the last step must have run, not only started.
      self.close(step)

  def close(self, step: int | None = None) -> None:
    """Ends a running trace: at the window's end, or where the loop stopped before it (`step` unknown)."""
    if self._local is None:
      return
    local, self._local, self._done = self._local, None, True
    jax.profiler.stop_trace()
    if local != self.directory:
      _upload(local, self.directory)
      shutil.rmtree(local, ignore_errors=True)
    last = f' to {step - 1}' if step is not None else ' on'
    print(f'profile: steps {self._first}{last} traced into {self.directory} (tensorboard --logdir={self.directory}; '
          'perfetto_trace.json.gz opens in ui.perfetto.dev)', file=self.stream, flush=True)


def _upload(local: str, directory: str) -> None:
  for root, _, files in os.walk(local):
    for name in files:
      source = os.path.join(root, name)
      target = epath.Path(directory, os.path.relpath(source, local))
      target.parent.mkdir(parents=True, exist_ok=True)
      with open(source, 'rb') as f:
        target.write_bytes(f.read())
