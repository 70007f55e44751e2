"""gs:// workdirs without a network: the path helpers, and metrics/sweep/analysis I/O on an in-memory gs://."""
import importlib
import json
import os

from etils import epath
from fsspec.implementations import memory
import pytest

from train import analyze, paths, sweep
from train import metrics as metrics_lib


class _FakeGCS(memory.MemoryFileSystem):
  """gs:// held in memory, refusing appends as GCS does (gcsfs would silently overwrite instead)."""
  protocol = ('gs', 'gcs')
  store, pseudo_dirs = {}, ['']  # Its own, not memory://'s.

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(str(path).removeprefix('gs://'))

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode:
      raise NotImplementedError(f'{path}: GCS objects cannot be appended to')
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
  """epath's gs:// paths served by _FakeGCS: epath goes through fsspec's 'gcs' filesystem without TensorFlow."""
  monkeypatch.setenv('EPATH_USE_TF', 'false')
  monkeypatch.setitem(importlib.import_module('fsspec.registry')._registry, 'gcs', _FakeGCS)
  cached = importlib.import_module('etils.epath.backend').fsspec_backend._get_filesystem
  cached.cache_clear()
  _FakeGCS.store.clear()
  yield
  cached.cache_clear()
  _FakeGCS.store.clear()


def test_urls_stay_urls_and_local_paths_behave_as_before(tmp_path):
  assert paths.is_url('gs://b/x') and not paths.is_url('workdirs/x') and not paths.is_url('/abs/x')
  assert paths.absolute('gs://b/study/run') == 'gs://b/study/run'  # os.path.abspath gives $PWD/gs:/b/study/run
  assert paths.absolute('workdirs/x') == os.path.abspath('workdirs/x')
  assert os.path.join(paths.absolute('gs://b/x'), 'checkpoints') == 'gs://b/x/checkpoints'
  assert paths.split_glob('gs://b/study/*') == ('gs://b/study', '*')
  assert paths.split_glob('gs://b/study/nf*/run?') == ('gs://b/study', 'nf*/run?')
  assert paths.split_glob('gs://b/study/run') == ('gs://b/study/run', '')
  (tmp_path / 'b').mkdir()
  (tmp_path / 'a').mkdir()
  (tmp_path / 'c.txt').write_text('')
  assert paths.glob(f'{tmp_path}/*') == [str(tmp_path / n) for n in ('a', 'b', 'c.txt')]


def test_metrics_on_gs_are_rewritten_whole_never_appended(gcs):
  workdir = 'gs://bucket/run'
  writer = metrics_lib.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {'train/loss': float(step)})
  # A resumed run (a new writer) drops what followed its checkpoint, then carries on.
  resumed = metrics_lib.MetricWriter(workdir)
  resumed.truncate_after(2)
  resumed.write(3, {'train/loss': 30.0})
  resumed.write(4, {'train/loss': 4.0})
  assert [(r['step'], r['train/loss']) for r in metrics_lib.read_metrics(workdir)] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 4.0)]
  assert list(_FakeGCS.store) == ['/bucket/run/metrics.jsonl']  # No temporary objects left behind.


def test_sweep_and_analysis_find_and_read_gs_workdirs(gcs):
  study = {'family': 'nfnet', 'model': 'nf0', 'params': 1000, 'epochs': 1.0, 'learning_rate': 0.1}
  for name, last_step in (('nf0-e1', 10), ('nf0-e2', 5)):
    run = epath.Path('gs://bucket/study', name)
    run.mkdir(parents=True, exist_ok=True)
    (run / 'config.json').write_text(json.dumps({'total_steps': 10, 'study': study}))
    writer = metrics_lib.MetricWriter(str(run))
    writer.write(last_step, {'eval/loss': 1.5, 'compute/train_flops': 1e12})
    step_dir = run / 'checkpoints' / str(last_step)  # A run is finished only with its final checkpoint,
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / 'commit_success.txt').write_text('')  # committed the way orbax marks it on gs://.
  epath.Path('gs://bucket/study/study.md').write_text('')  # A file, not a workdir: not matched.
  assert sweep.finished('gs://bucket/study/nf0-e1') and not sweep.finished('gs://bucket/study/nf0-e2')
  found = analyze.find_workdirs(['gs://bucket/study/*'])
  assert found == ['gs://bucket/study/nf0-e1', 'gs://bucket/study/nf0-e2']
  assert analyze.read_run(found[0]).loss == 1.5
  assert analyze.read_run(found[1]).startswith('incomplete, left out: gs://bucket/study/nf0-e2 (at step 5/10')
