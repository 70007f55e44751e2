r"""Inference cost of any image classifier config (random weights) or trained run: speed, memory, FLOPs.

  python -m benchmarks.inference --config=configs/vit_i1k.py:variant=B/16 --config.model.dtype=float32 \
      --batch_sizes=1,8 --resolutions=224,384 --reference=timm:vit_base_patch16_384
  python -m benchmarks.inference --workdir=workdirs/vit_digits --batch_sizes=1,64 --json=/tmp/vit_digits.json

The model runs in evaluation mode (`train=False`: no dropout, no stochastic depth) under `jax.jit`, compiled
once per (batch, resolution); compile time is reported and kept out of the timings. Per row:
- images/s (batch / median seconds per call) and the latency p50 and p95 over --repeats timed calls, after
  one untimed warm-up call;
- XLA's memory analysis of the compiled call (arguments: parameters and images; output; temporaries: the
  activations and whatever XLA materialises, e.g. transposed or weight-standardised kernels; peak =
  arguments + output + temporaries - aliased) and the process's peak resident memory so far (getrusage);
- the parameter count, the model's analytic FLOPs per image (`models.<name>.forward_flops`: 2 x the
  multiply-accumulates of its matmuls and convolutions; Brock et al.'s NFNet "FLOPs" are MACs, half these)
  and XLA's FLOPs per image (`cost_analysis()` of the call; a scanned model is counted on an unscanned twin,
  compiled for abstract arguments, because XLA counts a loop body once).
With --workdir the parameters are the run's evaluated ones (train/tools/loader.py: the EMA copy when kept), at
another resolution resampled by the model's own hook (ViT position embeddings). --reference=timm:NAME times
timm's eval forward (torch.inference_mode) of the same architecture on the same images in a fresh process
(benchmarks/torch_peer.py; a process that ran JAX slows torch down).

Models are benchmarked in their config's dtype: the pod configs say bfloat16, which a CPU runs slowly; pass
--config.model.dtype=float32 there (and --config.model.conv_impl=taps for NFNets on a CPU: README, Benchmarks).
"""
import dataclasses
import json
import math
import resource
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from benchmarks.step import time_peer
from models import common
from train import build, cli, runs
from train.tools import loader

FLAGS = flags.FLAGS
_CONFIG = None  # The --config holder, defined with the other flags when run as a command.


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module next to another
  command's defines nothing twice)."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (random weights); or --workdir.',
                                            lock_config=False)
  flags.DEFINE_string('workdir', None, 'A trained run (or an imported model) to load instead of --config.')
  flags.DEFINE_list('batch_sizes', ['1', '32'], 'Batch sizes.')
  flags.DEFINE_list('resolutions', [], 'Square input resolutions (default: the run\'s own; 224 for a config).')
  flags.DEFINE_integer('channels', None, 'Input channels (default: the run\'s own; 3 for a config).')
  flags.DEFINE_integer('repeats', 10, 'Timed calls per row (after compilation and one warm-up call).')
  flags.DEFINE_string('reference', None, 'timm:MODEL_NAME: time timm\'s eval forward beside ours.')
  flags.DEFINE_string('json', None, 'Write the rows here as a JSON list.')
  flags.DEFINE_bool('traceback', False, 'Show the full traceback of an error before its one line.')


MIB = 2.0**20


@dataclasses.dataclass
class Target:
  """What is benchmarked: a config's model with random weights, or a run's."""
  config: object
  module: object      # models.<model_name>
  workdir: str | None
  channels: int
  resolution: int     # the default one: the run's own, or 224
  run: object = None  # the loaded run (its parameters at its own resolution)

  @property
  def name(self) -> str:
    kw = build.model_kwargs(self.config)
    return f"{self.config.model_name} {kw.get('variant') or ''}".strip()

  def model(self, **overrides):
    return self.module.Model(**{**build.model_kwargs(self.config), **overrides})

  def params(self, resolution: int, seed: int = 0):
    """Parameters for inputs of `resolution`: the run's (resampled when the model needs it), else random draws
    N(0, 0.02) of every parameter's shape (the values change no cost; the models' own initialisers take seconds
    to compile, an NFNet's ten on 2 cores)."""
    shape = (1, resolution, resolution, self.channels)
    if self.run is not None:
      if tuple(self.run.example_input.shape) == shape:
        return self.run.params
      return loader.load_run(self.workdir, input_shape=shape).params
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32), s.dtype),
                        common.abstract_params(self.model(), shape))


def target(config=None, workdir: str | None = None, channels: int | None = None) -> Target:
  """The Target of a config or a run directory; ValueError (one line) for anything that is not an image
  classifier."""
  if (config is None) == (workdir is None):
    raise ValueError('give either --config=CONFIG (random weights) or --workdir=RUN_DIR (a trained run).')
  resolution, run = 224, None
  if workdir:
    config = runs.read_config(workdir)  # Checked before any parameter is restored.
  task = (config.get('task') or {}).get('name')
  module = build.model_module(config)
  if task != 'classification' or not hasattr(module, 'forward_flops'):
    raise ValueError(f"{workdir or 'the config'}: model {config.model_name!r} with task {task!r} is not an image "
                     'classifier; benchmarks.inference times image classifiers (vit, nfnet).')
  if workdir:
    run = loader.load_run(workdir)
    config, shape = run.config, run.example_input.shape
    resolution, channels = shape[1], channels or shape[-1]
  return Target(config, module, workdir, channels or 3, resolution, run)


def forward(model):
  return jax.jit(lambda params, images: model.apply({'params': params}, images, train=False))


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def memory(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled call in MiB (empty when the backend gives none)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: getattr(m, f'{k}_size_in_bytes') / MIB for k in ('argument', 'output', 'temp', 'alias')}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) if cost and 'flops' in cost else None


def peak_rss_mib() -> float:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS.
  return rss / (MIB if sys.platform == 'darwin' else 1024.0)


def unscanned_flops(t: Target, batch: int, resolution: int) -> float | None:
  """XLA's FLOPs of the call on an unscanned twin of a scanned model (compiled for abstract arguments)."""
  twin = t.model(scan=False)
  shape = (batch, resolution, resolution, t.channels)
  params = common.abstract_params(twin, shape)
  return xla_flops(forward(twin).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile())


def peer_job(spec: str, t: Target, resolution: int) -> dict:
  if not spec.startswith('timm:') or len(spec) == 5:
    raise ValueError(f'--reference={spec!r} is unknown: use timm:MODEL_NAME, e.g. timm:vit_base_patch16_384.')
  return dict(spec=spec, mode='infer', num_classes=int(t.config.model.get('num_classes') or 1000),
              channels=t.channels, image_size=resolution)


def percentiles(times: list[float]) -> tuple[float, float]:
  return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def measure(t: Target, batch: int, resolution: int, params, repeats: int, reference: str | None = None) -> dict:
  """One row: timings, memory and FLOPs of the eval forward at (batch, resolution)."""
  model = t.model()
  images = np.random.default_rng(0).standard_normal((batch, resolution, resolution, t.channels), np.float32)
  lowered = forward(model).lower(abstract(params), jax.ShapeDtypeStruct(images.shape, jnp.float32))
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  x = jnp.asarray(images)
  jax.block_until_ready(compiled(params, x))  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - start)
  p50, p95 = percentiles(times)
  kw = build.model_kwargs(t.config)
  flops = unscanned_flops(t, batch, resolution) if kw.get('scan') else xla_flops(compiled)
  row = dict(model=t.name, source=t.workdir or 'random weights', dtype=str(kw.get('dtype', 'float32')), batch=batch,
             resolution=resolution, channels=t.channels,
             params=int(sum(math.prod(np.shape(p)) for p in jax.tree.leaves(params))),
             analytic_gflops_per_image=t.module.forward_flops(kw, (resolution, resolution, t.channels)) / 1e9,
             xla_gflops_per_image=None if flops is None else flops / batch / 1e9,
             compile_s=compile_s, repeats=repeats, p50_ms=1e3 * p50, p95_ms=1e3 * p95, images_per_s=batch / p50,
             memory_mib=memory(compiled), peak_rss_mib=peak_rss_mib())
  if reference:
    peer = time_peer(peer_job(reference, t, resolution), {'image': images, 'label': np.zeros(batch, np.int32)},
                     repeats)
    p50, p95 = percentiles(peer['times'])
    row['reference'] = dict(spec=reference, p50_ms=1e3 * p50, p95_ms=1e3 * p95, images_per_s=batch / p50,
                            torch=peer.get('torch'))
  return row


def benchmark(t: Target, batch_sizes, resolutions, repeats: int = 10, reference: str | None = None, log=print):
  """Rows for every (resolution, batch size); `log` gets each row's table line as it is measured."""
  if reference:
    peer_job(reference, t, 0)  # A bad spec fails before anything compiles.
  if repeats < 1 or not batch_sizes or min(batch_sizes) < 1 or not resolutions or min(resolutions) < 1:
    raise ValueError(f'batch sizes {list(batch_sizes)}, resolutions {list(resolutions)} and --repeats={repeats} '
                     'must be positive.')
  rows = []
  log(header(reference))
  for resolution in resolutions:
    params = t.params(resolution)
    for batch in batch_sizes:
      rows.append(measure(t, batch, resolution, params, repeats, reference))
      log(line(rows[-1]))
  return rows


def si(x, unit: str = '') -> str:
  """1234567 -> '1.235M' (k, M, G, T)."""
  if x is None:
    return '-'
  for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= scale:
      return f'{x / scale:.4g}{prefix}{unit}'
  return f'{x:.4g}{unit}'


def size(mib) -> str:
  """MiB -> '12.3 MiB' / '1.2 GiB' / '40.0 KiB'."""
  if mib is None:
    return '-'
  for scale, unit in ((1024.0, 'GiB'), (1.0, 'MiB'), (1 / 1024, 'KiB')):
    if mib >= scale:
      return f'{mib / scale:.1f} {unit}'
  return f'{mib * MIB:.0f} B'


def header(reference: str | None = None) -> str:
  cols = ['model', 'batch', 'res', 'images/s', 'p50 ms', 'p95 ms', 'compile s', 'params', 'FLOPs/img analytic',
          'FLOPs/img XLA', 'XLA args', 'XLA temp', 'XLA peak', 'peak RSS']
  if reference:
    cols += [f'{reference} images/s', 'p50 ms', 'p95 ms']
  return '| ' + ' | '.join(cols) + ' |\n|' + '---|' * len(cols)


def line(r: dict) -> str:
  m = r['memory_mib']
  flops = [None if r[k] is None else r[k] * 1e9 for k in ('analytic_gflops_per_image', 'xla_gflops_per_image')]
  cells = [r['model'], r['batch'], r['resolution'], f"{r['images_per_s']:.4g}", f"{r['p50_ms']:.4g}",
           f"{r['p95_ms']:.4g}", f"{r['compile_s']:.2f}", si(r['params']), si(flops[0]), si(flops[1]),
           size(m.get('argument')), size(m.get('temp')), size(m.get('peak')), size(r['peak_rss_mib'])]
  if 'reference' in r:
    ref = r['reference']
    cells += [f"{ref['images_per_s']:.4g}", f"{ref['p50_ms']:.4g}", f"{ref['p95_ms']:.4g}"]
  return '| ' + ' | '.join(map(str, cells)) + ' |'


def _ints(values, name: str) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--{name}={",".join(values)}: give comma-separated integers, e.g. --{name}=1,32') from None


def main(argv):
  cli.no_arguments(argv)
  cli.quiet_logging()
  with cli.ending_failures(FLAGS.traceback):
    t = target(_CONFIG.value, FLAGS.workdir, FLAGS.channels)
    resolutions = _ints(FLAGS.resolutions, 'resolutions') or [t.resolution]
    if FLAGS.reference:
      peer_job(FLAGS.reference, t, 0)  # A bad spec fails before anything is printed or compiled.
    print(f'{t.name} from {t.workdir or "random weights"}, eval forward, {jax.devices()[0].device_kind}; '
          f'FLOPs = 2 x multiply-accumulates; latency over {FLAGS.repeats} calls after compilation')
    rows = benchmark(t, _ints(FLAGS.batch_sizes, 'batch_sizes'), resolutions, FLAGS.repeats, FLAGS.reference)
    if FLAGS.json:
      with open(FLAGS.json, 'w') as f:
        json.dump(rows, f, indent=1)


def _parse(argv):
  if any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    return cli.parse_flags(argv, _CONFIG, example='configs/vit_i1k.py:variant=B/16')
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(f'{cli.one_line(e)} (see --helpfull)')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=_parse)
