"""Metrics: WORKDIR/metrics.jsonl (one JSON object per logged step, the source of truth), the same scalars as
TensorBoard event files in WORKDIR/tensorboard, the human progress line and the run's start-up line."""
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from etils import epath
import jax
import numpy as np

from train import paths, sharding


class MetricWriter:
  """Appends one JSON line per logged step; on resume drops lines past the restored step.

  A local file stays open for appending and each record is flushed and fsynced as it is written, so a crash
  or a full disk tears at most the last line; a resumed run drops a torn last line with a note on stderr
  (any other malformed line is an error naming it). A gs:// file is rewritten whole at every write instead
  (objects cannot be appended to, and gcsfs would silently overwrite): the writer keeps its text, and every
  version of the object is complete.

  tensorboard=True writes each record's scalars to TensorBoard too (see _EventWriter). close() when done.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = False, stream=None):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self.stream = stream or sys.stderr  # Where the torn-line note goes.
    self._text = None  # A gs:// file's contents, once read.
    self._file = None  # The local file, open for appending.
    self._events = _EventWriter(os.path.join(workdir, 'tensorboard')) if enabled and tensorboard else None

  def truncate_after(self, step: int) -> None:
    """Keeps the history up to `step` so a resumed run rewrites the rest exactly once: eval_at_start's record at
    step 0 included. At step 0 nothing is kept: such a run has trained nothing, and rewrites that record itself."""
    if not self.enabled:
      return
    if self._events:
      self._events.purge_after(step)
    self._close_file()
    file = epath.Path(self.path)
    if not file.exists():
      return
    records, torn = _parse(file.read_bytes(), self.path)
    if torn:
      print(f'note: dropped the torn last line {torn} of {self.path} (a write cut short, e.g. by a full disk); '
            'the resumed run writes that step again.', file=self.stream, flush=True)
    kept = ''.join(json.dumps(r) + '\n' for r in records if step > 0 and r['step'] <= step)
    if paths.is_url(self.path):  # One upload replaces the object whole.
      self._text = kept
      file.write_text(self._text)
      return
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(kept)
      f.flush()
      os.fsync(f.fileno())
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
    else:
      if self._file is None:
        self._file = open(self.path, 'a')
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())
    if self._events:
      self._events.write(record)

  def close(self) -> None:
    self._close_file()
    if self._events:
      self._events.close()

  def _close_file(self):
    if self._file is not None:
      self._file.close()
      self._file = None


class _EventWriter:
  """Every scalar of each record as a TensorBoard scalar (tag: the metrics key, e.g. train/loss; step: the
  record's step) in an event file of this run under DIR (tensorboardX: no TensorFlow). A run that resumed at
  step S starts its file with a purge of the steps after S (after 0: all), so that TensorBoard, reading the
  files in name order, shows each step once as metrics.jsonl does. A gs:// DIR gets the file through a local
  one, copied up whole after each record (as metrics.jsonl is rewritten whole there)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._purge_step = None
    self._writer = None
    self._local = None

  def purge_after(self, step: int) -> None:
    self._purge_step = step + 1 if step > 0 else 0

  def write(self, record: dict[str, Any]) -> None:
    scalars = {k: v for k, v in record.items() if k != 'step' and isinstance(v, (int, float))}
    if not scalars:
      return
    writer = self._open()
    for tag, value in scalars.items():
      writer.add_scalar(tag, value, global_step=record['step'])
    writer.flush()
    self._upload()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._upload()
      self._writer = None
    if self._local != self.directory and self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)

  def _open(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter
      self._local = tempfile.mkdtemp(prefix='tensorboard_') if paths.is_url(self.directory) else self.directory
      # TensorBoard reads a directory's files in name order, and tensorboardX names them by the second: the
      # nanoseconds order two writers started within one second (a purge must follow what it purges).
      suffix = f'.{time.time_ns() % 10**9:09d}.{os.getpid()}'
      self._writer = SummaryWriter(self._local, purge_step=self._purge_step, flush_secs=30,
                                   filename_suffix=suffix)
    return self._writer

  def _upload(self):
    if self._local == self.directory or self._writer is None:
      return
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), 'rb') as f:
        epath.Path(self.directory, name).write_bytes(f.read())


def _parse(data: bytes, path: str) -> tuple[list[dict[str, Any]], int | None]:
  """The records of a metrics.jsonl, and the number of its last line if that one is torn (dropped).

  A torn last line is what an interrupted append leaves: a prefix of a record, or the zeros a file system
  may leave after a crash. A malformed line before the last cannot come from that: ValueError naming it.
  """
  lines = data.split(b'\n')
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  records = []
  for i, line in enumerate(lines[:last + 1]):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:  # Not JSON, or not UTF-8.
      record = None
    if isinstance(record, dict) and isinstance(record.get('step'), int) and not isinstance(record['step'], bool):
      records.append(record)
    elif i == last:
      return records, i + 1
    else:
      shown = line[:60].decode('utf-8', 'replace')
      raise ValueError(f'{path} line {i + 1} is not a metrics record ({shown!r}); only a torn last line is dropped '
                       'on resume: repair or delete that line (the checkpoints do not depend on it), then rerun.')
  return records, None


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl; a torn last line (a run writing it now, or cut short) is left out."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return _parse(epath.Path(path).read_bytes(), path)[0]


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


def bytes_on_device(tree, device) -> int:
  """Bytes of `tree`'s arrays held on `device`: a replicated array counts whole, a sharded one its shard."""
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)
             for shard in leaf.addressable_shards if shard.device == device)


def size_text(n: float) -> str:
  """1536 -> '1.50 KiB'."""
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024


def startup_line(devices, mesh, num_params: int, num_trainable: int, state: dict[str, Any],
                 frozen: dict[str, Any]) -> str:
  """What runs where: the devices, the mesh, the parameter counts and the state's bytes on one device
  (trainable, optimizer state, EMA where kept, frozen trees), which with the step's activations fill it."""
  kinds = ', '.join(sorted({d.device_kind for d in devices}))
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  parts = {'trainable': state['trainable'], 'optimizer': state['opt_state'], 'ema': state.get('ema'),
           'frozen': frozen}
  sizes = {name: bytes_on_device(tree, device) for name, tree in parts.items() if tree is not None}
  return (f'start: {len(devices)} x {kinds} | mesh {sharding.mesh_text(mesh.shape)} | {num_params:,} parameters ({num_trainable:,} '
          f'trainable) | state {size_text(sum(sizes.values()))} per device ('
          + ', '.join(f'{name} {size_text(n)}' for name, n in sizes.items()) + ')')
