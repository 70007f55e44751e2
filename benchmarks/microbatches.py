r"""Gradient accumulation: the compiled train step's memory and time as `microbatches` splits the batch.

For each count, XLA's memory analysis of the compiled step (temporaries: activations and gradients in flight;
arguments: state and batch) and the median step time after compilation, on one device:

  python -m benchmarks.microbatches --config=configs/vit_i1k.py --batch_size=32 --image_size=224 \
      --microbatches=1,2,4,8 --config.model.dtype=float32 --config.model.scan=False --config.model.remat=False

The update is the same whatever the split (tests/train/test_steps.py); the temporaries fall with the
micro-batch size, which is what lets a batch that does not fit be trained anyway.
"""
from absl import app, flags
import jax
from ml_collections import config_flags

from benchmarks.step import compile_step
from train import objectives

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file to benchmark.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
_IMAGE = flags.DEFINE_integer('image_size', 224, 'Square input resolution (image objectives).')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Input channels (image objectives).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'Tokens per row (language-model objectives).')
_MICRO = flags.DEFINE_list('microbatches', ['1', '2', '4', '8'], 'Micro-batch counts to compare.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per count (after one warm-up step).')


def measure(config, batch, microbatches: int) -> tuple[dict[str, int], float]:
  config.microbatches = microbatches
  step = compile_step(config, batch, jax.devices()[:1])
  memory = step.compiled.memory_analysis()
  sizes = {'temp': memory.temp_size_in_bytes, 'arguments': memory.argument_size_in_bytes,
           'outputs': memory.output_size_in_bytes}
  return sizes, step.time(_STEPS.value)


def main(argv):
  del argv
  config = _CONFIG.value
  config.batch_size = config.eval_batch_size = _BATCH.value
  objective = objectives.make_objective(config.task)
  batch = objective.synthetic_batch(config, _BATCH.value,
                                    objective.example_shape(_IMAGE.value, _CHANNELS.value, _SEQ_LEN.value))
  print(f'{config.model_name}, batch {_BATCH.value}, {jax.devices()[0].device_kind}')
  print('microbatches | micro-batch | temporaries MiB | arguments MiB | step ms')
  for m in map(int, _MICRO.value):
    if _BATCH.value % m:
      print(f'{m:>12} | skipped: does not divide the batch')
      continue
    sizes, seconds = measure(config, batch, m)
    print(f'{m:>12} | {_BATCH.value // m:>11} | {sizes["temp"] / 2**20:>15.1f} | '
          f'{sizes["arguments"] / 2**20:>13.1f} | {seconds * 1e3:>7.1f}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
