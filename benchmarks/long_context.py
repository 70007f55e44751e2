r"""Long rows of the small Mistral split over a `sequence` mesh axis: bytes per device, step time, longest row.

  JAX_NUM_CPU_DEVICES=4 python -m benchmarks.long_context
  JAX_NUM_CPU_DEVICES=4 python -m benchmarks.long_context --lengths=4096,16384,65536 --sequence=1,2,4 \
      --time_lengths=4096 --budget_gib=2

The model is issue 15's small Mistral (8 layers, 512 wide, 8 query and 2 K/V heads of 64, MLP 1536, vocabulary
4096, window 256, blocks of 256), float32, its layers scanned and rematerialised (--remat), one row per step.
For each (length, sequence) it compiles the train step for the mesh data=1 x sequence=N (the loop's own step:
train.memory.programs, nothing allocated) and prints XLA's memory analysis for one device: the temporaries
(activations, gradients, the optimizer's update) and the arguments (parameters, AdamW moments, the device's
share of the row), and the step's collective permutes (the halo: the tokens a device receives per layer and
direction, which do not grow with the length). For the lengths in --time_lengths it also runs the step
(median of --steps after a warm-up). Then, per sequence setting, the longest row, doubling from the first
length, whose step fits --budget_gib per device.

What the figures can say on a CPU: the bytes are XLA:CPU's buffer assignment for one device of the mesh, exact
for this backend (a TPU's fusions differ a little); the virtual CPU devices share this machine's 2 cores, so
the step time shows what the split costs in extra work, not the speed-up N real devices would give.
"""
import re
import statistics
import time

from absl import app, flags
import flax.linen as nn
import jax

from configs import mistral_tiny
from train import memory, sharding

_LENGTHS = flags.DEFINE_list('lengths', ['4096', '16384', '65536'], 'Row lengths (tokens).')
_SEQUENCE = flags.DEFINE_list('sequence', ['1', '2', '4'], 'Sizes of the sequence mesh axis.')
_TIME_LENGTHS = flags.DEFINE_list('time_lengths', ['4096'], 'Lengths whose step is also run and timed.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps (after one warm-up step).')
_BUDGET = flags.DEFINE_float('budget_gib', 2.0, 'Per-device memory budget of the longest-row search (GiB).')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 1 << 20, 'Where the longest-row search stops.')
_REMAT = flags.DEFINE_enum('remat', 'full', ['none', 'full', 'save_proj'], "The model's remat policy.")

GIB = 1024 ** 3
SMALL_MISTRAL = dict(embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64, mlp_dim=1536,
                     vocab_size=4096, sliding_window=256, block_size=256, dtype='float32', scan=True)


def config_for(length: int, shards: int):
  c = mistral_tiny.get_config()
  c.model.update(SMALL_MISTRAL, remat=_REMAT.value)
  c.data.seq_len = length
  c.batch_size = c.eval_batch_size = 1
  c.total_steps = 10
  c.schedule.warmup_steps = 1
  c.mesh.update(data=1, fsdp=1, sequence=shards, tensor=1)
  return c


def halo_tokens(hlo_text: str) -> list[int]:
  """Tokens of each collective permute of keys or values ([b, m, kv_heads, head_dim]) in a compiled program."""
  return [int(m) for m in re.findall(r'= f32\[\d+,(\d+),2,64\]\{[^}]*\} collective-permute', hlo_text)]


def measure(length: int, shards: int, timed: bool) -> dict:
  config = config_for(length, shards)
  programs = memory.programs(config, jax.devices()[:shards])
  started = time.perf_counter()
  compiled = programs.lower_train().compile()
  out = {'length': length, 'sequence': shards, 'compile_s': time.perf_counter() - started}
  stats = compiled.memory_analysis()
  out['temp'] = stats.temp_size_in_bytes
  out['args'] = stats.argument_size_in_bytes
  out['halo'] = sorted(set(halo_tokens(compiled.as_text())))
  if timed:
    out['step_s'] = _time(programs, compiled)
  return out


def _time(programs, compiled) -> float:
  fns, config = programs.fns, programs.config
  batch = programs.objective.synthetic_batch(config, config.batch_size, (config.data.seq_len,))
  with jax.set_mesh(programs.mesh), nn.logical_axis_rules(programs.rules):
    state, _ = fns.init(fns.init_key)
    args = [state, {}, sharding.global_batch(batch, fns.batch_sharding), fns.learning_rates[0]]
    times = []
    for i in range(_STEPS.value + 1):
      start = time.perf_counter()
      args[0], metrics = compiled(*args)
      jax.block_until_ready(metrics)
      if i:
        times.append(time.perf_counter() - start)
  return statistics.median(times)


def longest(shards: int, start: int) -> tuple[int, float]:
  """The longest row (start x 2^k, at most --max_length) whose step's temporaries and arguments fit the
  budget on one device of a sequence=shards mesh, and its bytes."""
  best, length = (0, 0.0), start
  while length <= _MAX_LENGTH.value:
    m = measure(length, shards, timed=False)
    total = m['temp'] + m['args']
    print(f'  sequence={shards}: {length:>8,} tokens -> {total / GIB:.2f} GiB per device', flush=True)
    if total > _BUDGET.value * GIB:
      break
    best, length = (length, total), length * 2
  return best


def main(argv):
  del argv
  lengths = [int(x) for x in _LENGTHS.value]
  settings = [int(x) for x in _SEQUENCE.value]
  if max(settings) > jax.device_count():
    raise app.UsageError(f'--sequence up to {max(settings)} needs that many devices; run with '
                         f'JAX_NUM_CPU_DEVICES={max(settings)}.')
  timed = {int(x) for x in _TIME_LENGTHS.value}
  print(f'small Mistral {SMALL_MISTRAL} remat={_REMAT.value}, one row per step, float32, on '
        f'{jax.device_count()} {jax.devices()[0].platform} devices')
  print(f'{"length":>8} {"seq":>4} {"temporaries":>12} {"arguments":>10} {"total":>9} {"vs seq=1":>9} '
        f'{"halo tokens":>12} {"compile":>8} {"step":>8}')
  for length in lengths:
    base = None
    for shards in settings:
      m = measure(length, shards, timed=length in timed)
      total = m['temp'] + m['args']
      base = base or total
      step = f'{m["step_s"]:.2f} s' if 'step_s' in m else '-'
      print(f'{length:>8,} {shards:>4} {m["temp"] / GIB:>10.3f} G {m["args"] / GIB:>8.3f} G {total / GIB:>7.3f} G '
            f'{total / base:>8.2f}x {",".join(map(str, m["halo"])) or "-":>12} {m["compile_s"]:>6.1f} s {step:>8}',
            flush=True)
  print(f'longest row within {_BUDGET.value:g} GiB per device (doubling from {lengths[0]:,}):')
  for shards in settings:
    length, total = longest(shards, lengths[0])
    print(f'sequence={shards}: {length:,} tokens ({total / GIB:.2f} GiB)' if length else
          f'sequence={shards}: not even {lengths[0]:,} tokens', flush=True)


if __name__ == '__main__':
  app.run(main)
