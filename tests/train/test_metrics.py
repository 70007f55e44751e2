"""Observability and the metrics record: a torn metrics.jsonl line, TensorBoard event files that hold what
metrics.jsonl holds (also after a resume), profiler traces of chosen steps, and the start-up line."""
import contextlib
import glob
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from test_paths import gcs  # noqa: F401 - the in-memory gs:// fixture
from train import cli, loop, profiling
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not os.path.basename(p).startswith(('_', 'common')))
# tests/train/conftest.py's tiny ViT as command-line overrides of configs/vit_digits.py.
TINY_FLAGS = ('--config.model.width=16', '--config.model.depth=2', '--config.model.mlp_dim=32',
              '--config.model.num_heads=2', '--config.model.patch_size=4', '--config.batch_size=16',
              '--config.eval_batch_size=16', '--config.schedule.warmup_steps=1', '--config.total_steps=4',
              '--config.log_every_steps=1', '--config.eval_every_steps=3', '--config.checkpoint_every_steps=3')


def _run(config, workdir):
  """loop.train, with what it prints on stdout and stderr."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    result = loop.train(config, workdir)
  return result, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def resumed_run(digits_dir, tiny_config, tmp_path_factory):
  """4 steps (checkpoints at 3 and 4, steps 1-2 traced), then the workdir as a full disk leaves it: the write
  of step 4's line cut short and no checkpoint after step 3; then the same command again, which resumes."""
  workdir = tmp_path_factory.mktemp('observed')
  config = tiny_config(digits_dir, total_steps=4, eval_every_steps=3, checkpoint_every_steps=3, profile_steps=(1, 3))
  first, out_1, _ = _run(config, str(workdir))
  metrics = workdir / 'metrics.jsonl'
  lines = metrics.read_bytes().splitlines(keepends=True)
  assert json.loads(lines[-1])['step'] == 4
  metrics.write_bytes(b''.join(lines[:-1]) + lines[-1][:25])
  shutil.rmtree(workdir / 'checkpoints' / '4')
  _, out_2, err_2 = _run(config, str(workdir))
  return {'workdir': workdir, 'config': config, 'first': first, 'out_1': out_1, 'out_2': out_2, 'err_2': err_2}


def _cli(workdir, *flags, data_dir):
  cmd = [sys.executable, '-m', 'train', '--config=configs/vit_digits.py', f'--workdir={workdir}',
         f'--config.data.data_dir={data_dir}', *TINY_FLAGS, *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


# metrics.jsonl

def test_a_torn_last_line_is_dropped_on_resume_with_a_note(resumed_run):
  workdir = resumed_run['workdir']
  notes = [l for l in resumed_run['err_2'].splitlines() if 'torn' in l]
  assert notes == [f'note: dropped the torn last line 4 of {workdir}/metrics.jsonl (a write cut short, e.g. by a '
                   'full disk); the resumed run writes that step again.']
  assert f'resumed from {workdir}/checkpoints at step 3' in resumed_run['out_2']
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2, 3, 4]  # Each line whole, each step once.


def test_a_malformed_line_before_the_last_stops_with_one_line(resumed_run, digits_dir, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(resumed_run['workdir'], workdir)
  lines = (workdir / 'metrics.jsonl').read_text().splitlines(keepends=True)
  lines[1] = lines[1][:20] + '\n'  # Not what an interrupted append leaves: something else wrote this file.
  (workdir / 'metrics.jsonl').write_text(''.join(lines))
  out = _cli(workdir, data_dir=digits_dir)
  assert out.returncode == cli.BAD_INPUT_EXIT, out.stderr[-2000:]
  (line,) = out.stderr.splitlines()
  assert line.startswith(f'error: {workdir}/metrics.jsonl line 2 is not a metrics record'), line
  assert 'repair or delete that line' in line


def test_records_are_on_disk_as_soon_as_written_and_the_file_closes(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(1, {'train/loss': 2.5})
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1, "train/loss": 2.5}\n'  # Not buffered.
  writer.write(2, {'train/loss': np.float32(1.5)})
  assert metrics_lib.read_metrics(str(tmp_path)) == [{'step': 1, 'train/loss': 2.5}, {'step': 2, 'train/loss': 1.5}]
  handle = writer._file
  writer.close()
  assert handle.closed


def test_a_reader_skips_the_line_being_written(tmp_path):
  (tmp_path / 'metrics.jsonl').write_bytes(b'{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n\x00\x00\x00\x00')
  assert metrics_lib.read_metrics(str(tmp_path)) == [{'step': 1, 'a': 1}, {'step': 2, 'a': 2}]
  (tmp_path / 'metrics.jsonl').write_bytes(b'{"step": 1, "a": 1}\n{"step": 2, "a"\n{"step": 3, "a": 3}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl line 2 is not a metrics record'):
    metrics_lib.read_metrics(str(tmp_path))


def test_a_run_restored_at_step_0_rewrites_its_step_0_record(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(0, {'eval/loss': 2.0})  # eval_at_start, then killed before any checkpoint.
  writer.write(1, {'train/loss': 1.0})
  writer.close()
  again = metrics_lib.MetricWriter(str(tmp_path))
  again.truncate_after(0)
  again.write(0, {'eval/loss': 2.0})
  again.close()
  assert metrics_lib.read_metrics(str(tmp_path)) == [{'step': 0, 'eval/loss': 2.0}]


def test_a_run_restored_later_keeps_its_step_0_record(tmp_path):
  """eval_at_start's numbers (the held-out loss before training) survive a resume from a later checkpoint."""
  writer = metrics_lib.MetricWriter(str(tmp_path))
  for step, record in ((0, {'eval/loss': 2.0}), (1, {'train/loss': 1.0}), (2, {'train/loss': 0.5}),
                       (3, {'train/loss': 0.4})):
    writer.write(step, record)
  writer.close()
  again = metrics_lib.MetricWriter(str(tmp_path))
  again.truncate_after(2)
  again.close()
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path))] == [0, 1, 2]


# TensorBoard

def _tensorboard(directory) -> dict[str, list[tuple[int, float]]]:
  events = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def _jsonl_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """metrics.jsonl as TensorBoard stores it: float32 scalars by tag."""
  scalars = {}
  for record in metrics_lib.read_metrics(str(workdir)):
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)):
        scalars.setdefault(key, []).append((record['step'], float(np.float32(value))))
  return scalars


def test_tensorboard_holds_every_scalar_of_metrics_jsonl_after_a_resume(resumed_run):
  workdir = resumed_run['workdir']
  assert len(glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))) == 2  # The run and its resumption.
  expected = _jsonl_scalars(workdir)
  assert {'train/loss', 'eval/accuracy', 'eval/loss', 'compute/train_flops', 'perf/steps_per_s'} <= set(expected)
  assert [s for s, _ in expected['eval/accuracy']] == [3, 4]
  # Step 4 was written twice (before the cut and after the resume); TensorBoard shows it once.
  assert _tensorboard(workdir / 'tensorboard') == expected


def test_tensorboard_of_a_gs_workdir_is_copied_up_whole(gcs, tmp_path):  # noqa: F811 - the fixture
  workdir = 'gs://bucket/run'
  writer = metrics_lib.MetricWriter(workdir, tensorboard=True)
  for step in (1, 2, 3):
    writer.write(step, {'train/loss': float(step), 'eval/accuracy': 0.5, 'note': 'text is not a scalar'})
  writer.close()
  resumed = metrics_lib.MetricWriter(workdir, tensorboard=True)
  resumed.truncate_after(2)
  resumed.write(3, {'train/loss': 30.0})
  resumed.close()
  local = tmp_path / 'tensorboard'
  local.mkdir()
  for event_file in epath.Path(workdir, 'tensorboard').iterdir():
    (local / event_file.name).write_bytes(event_file.read_bytes())
  assert len(list(local.iterdir())) == 2
  assert _tensorboard(local) == {'train/loss': [(1, 1.0), (2, 2.0), (3, 30.0)],
                                 'eval/accuracy': [(1, 0.5), (2, 0.5)]}
  assert _tensorboard(local) == _jsonl_scalars(workdir)


# Profiler traces

def _traced_steps(trace_dir) -> set[int]:
  """The step numbers of the StepTraceAnnotations in a trace folder's Perfetto file."""
  with gzip.open(os.path.join(trace_dir, 'perfetto_trace.json.gz')) as f:
    events = json.load(f)['traceEvents']
  return {int(e['args']['step_num']) for e in events if e.get('name') == 'train' and 'step_num' in e.get('args', {})}


def test_profile_steps_trace_those_steps_for_tensorboard_and_perfetto(resumed_run):
  (run,) = glob.glob(str(resumed_run['workdir'] / 'profile' / 'plugins' / 'profile' / '*'))  # None on resume at 3.
  assert glob.glob(os.path.join(run, '*.xplane.pb')), os.listdir(run)  # TensorBoard's profile plugin / XProf.
  assert _traced_steps(run) == {1, 2}
  assert f"profile: steps 1 to 2 traced into {resumed_run['workdir']}/profile" in resumed_run['out_1']


@pytest.mark.parametrize('value', [(3,), (1, 2, 3), (5, 2), (2, 2), (-1, 4), (1.0, 3), ('1', '3'), (True, 3), 7])
def test_profile_steps_must_be_two_ordered_steps(value):
  with pytest.raises(ValueError, match=r'is not two integers START, STOP with 0 <= START < STOP; e.g. '
                                       r'--config.profile_steps=10,15'):
    profiling.parse_steps(value)


@pytest.mark.parametrize('value', [None, (), (None,)])
def test_profile_steps_off(value):
  assert profiling.parse_steps(value) is None
  assert not profiling.StepProfiler(value, 'unused').enabled


def test_a_bad_profile_steps_stops_the_run_with_one_line(digits_dir, tmp_path):
  out = _cli(tmp_path, '--config.profile_steps=5,2', data_dir=digits_dir)
  assert out.returncode == cli.BAD_INPUT_EXIT, out.stderr[-2000:]
  (line,) = out.stderr.splitlines()
  assert line.startswith('error: profile_steps=(5, 2) is not two integers START, STOP with 0 <= START < STOP'), line
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_takes_profile_steps_from_the_command_line(name):
  path = os.path.join(REPO, 'configs', f'{name}.py')
  config = cli.load_config(path, ['--config.profile_steps=10,15'])
  assert profiling.parse_steps(config.profile_steps) == (10, 15)
  assert profiling.parse_steps(cli.load_config(path).profile_steps) is None


def test_a_gs_trace_is_made_locally_and_copied_up(gcs):  # noqa: F811 - the fixture
  profiler = profiling.StepProfiler((0, 1), 'gs://bucket/run/profile', stream=io.StringIO())
  profiler.before_step(0)
  with profiler.annotate(0):
    out = jax.jit(lambda x: x @ x)(jnp.ones((8, 8)))
  profiler.after_step(1, out)
  names = [str(p) for p in epath.Path('gs://bucket/run/profile').glob('plugins/profile/*/*')]
  assert any(n.endswith('.xplane.pb') for n in names) and any(n.endswith('perfetto_trace.json.gz') for n in names)


def test_the_benchmark_traces_its_timed_steps(tmp_path):
  from benchmarks import step as bench
  args = [jnp.zeros((8, 8)), jnp.ones((8, 8))]  # A stand-in step: (state, x) -> (new state, metrics).
  compiled = bench.CompiledStep(jax.jit(lambda s, x: (s + x @ x, s.sum())).lower(*args).compile(), args)
  with contextlib.redirect_stdout(io.StringIO()):
    compiled.time(2, profile_dir=str(tmp_path))
  (run,) = glob.glob(str(tmp_path / 'plugins' / 'profile' / '*'))
  assert glob.glob(os.path.join(run, '*.xplane.pb'))
  assert _traced_steps(run) == {1, 2}  # The timed steps, not the warm-up step 0.
  np.testing.assert_array_equal(args[0], 3 * 8 * np.ones((8, 8)))  # Three steps ran, carrying the state.


# The start-up line

_SIZE = {'B': 1, 'KiB': 1024, 'MiB': 1024**2, 'GiB': 1024**3}


def test_the_start_up_line_says_what_runs_where(resumed_run):
  (line,) = [l for l in resumed_run['out_1'].splitlines() if l.startswith('start:')]
  config = resumed_run['config']
  params = jax.eval_shape(lambda: loop.build_model(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert f'start: {jax.device_count()} x cpu | mesh data={jax.device_count()} fsdp=1 tensor=1 | ' in line
  assert f'| {count:,} parameters ({count:,} trainable) |' in line
  # Everything is replicated on a data-parallel mesh: each device holds all of the state.
  state = resumed_run['first']['state']
  expected = {'trainable': state['trainable'], 'optimizer': state['opt_state']}
  for name, tree in expected.items():
    value, unit = re.search(rf'{name} ([\d.]+) (\w+)', line).groups()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    assert float(value) * _SIZE[unit] == pytest.approx(nbytes, rel=5e-3), (name, line)
  assert 'frozen 0 B)' in line
  # Compiled here, or reused when an earlier test in this worker process ran the same program (steps.build).
  assert re.search(r'^compute: .* \| train step (compiled in \d+\.\d s|reused from an earlier run in this process '
                   r'\d+\.\d s)$', resumed_run['out_1'], re.M), resumed_run['out_1']


def test_bytes_on_device_count_a_shard_where_sharded():
  mesh = jax.make_mesh((8,), ('x',))
  sharded = jax.device_put(jnp.zeros((8, 4), jnp.float32), NamedSharding(mesh, P('x')))
  replicated = jax.device_put(jnp.zeros((3,), jnp.int8), NamedSharding(mesh, P()))
  assert metrics_lib.bytes_on_device({'a': sharded, 'b': replicated}, jax.devices()[0]) == 4 * 4 + 3
