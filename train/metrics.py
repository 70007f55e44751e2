"""Metrics: WORKDIR/metrics.jsonl (one JSON object per logged step) and a human progress line."""
import json
import os
import sys
import time
from typing import Any

from etils import epath
import numpy as np

from train import paths


class MetricWriter:
  """Appends one JSON line per logged step; on resume drops lines past the restored step.

  A gs:// file is rewritten whole at every write instead (objects cannot be appended to, and gcsfs would
  silently overwrite): the writer keeps its text, and every version of the object is complete.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self._text = None  # A gs:// file's contents, once read.

  def truncate_after(self, step: int) -> None:
    """Keeps the history up to `step` so a resumed run rewrites the rest exactly once."""
    file = epath.Path(self.path)
    if not self.enabled or not file.exists():
      return
    with file.open() as f:
      kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    if paths.is_url(self.path):  # One upload replaces the object whole.
      self._text = ''.join(kept)
      file.write_text(self._text)
      return
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    line = json.dumps(record) + '\n'
    if paths.is_url(self.path):
      file = epath.Path(self.path)
      if self._text is None:
        self._text = file.read_text() if file.exists() else ''
      self._text += line
      file.write_text(self._text)
      return
    with open(self.path, 'a') as f:
      f.write(line)


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with epath.Path(workdir, 'metrics.jsonl').open() as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Throughput, ETA and core-hours, measured between logged steps.

  num_cores: devices x cores per device (see train.compute); core-hours are num_cores x wall hours since
  the start, compilation included, plus `core_hours_before` (those of the run before a resume).
  """

  def __init__(self, total_steps: int, first_step: int, global_batch: int, num_cores: int,
               core_hours_before: float = 0.0, enabled: bool = True, stream=None):
    self.total_steps, self.global_batch, self.num_cores = total_steps, global_batch, num_cores
    self.core_hours_before = core_hours_before
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.start = self.last_time = time.monotonic()
    self.last_step = first_step

  def core_hours(self) -> float:
    return self.core_hours_before + self.num_cores * (time.monotonic() - self.start) / 3600.0

  def update(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    return {'perf/steps_per_s': steps_per_s, 'perf/examples_per_s': steps_per_s * self.global_batch,
            'compute/core_hours': self.core_hours()}

  def line(self, step: int, loss: float, perf: dict[str, float]) -> None:
    if not self.enabled:
      return
    rate = perf['perf/steps_per_s']
    eta = (self.total_steps - step) / rate if rate > 0 else float('inf')
    eta_s = time.strftime('%H:%M:%S', time.gmtime(eta)) if np.isfinite(eta) and eta < 86400 * 365 else '?'
    print(f'step {step}/{self.total_steps} | loss {loss:.4f} | {perf["perf/examples_per_s"]:.1f} ex/s | '
          f'{rate:.2f} steps/s | ETA {eta_s} | {perf["compute/core_hours"]:.4g} core-h', file=self.stream, flush=True)
