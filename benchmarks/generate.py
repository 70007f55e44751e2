r"""Times greedy decoding with the rolling KV cache (`models.mistral.generate`) beside HF `generate`.

A random-weight Mistral of the config's shape; a batch of random prompts; greedy decoding of a fixed number
of new tokens (HF is held to the same count with min_new_tokens, so neither side stops early). Prints the
wall time of a whole `generate` call (prefill included; median after one compile call), new tokens/s over the
batch, and with --reference the same call of HF `MistralForCausalLM.generate` (SDPA, KV cache) in a fresh
process, back to back, --pairs times. The small Mistral of issue 4, batch 1 and 8:

  python -m benchmarks.generate --config=configs/mistral_tiny.py --batch_sizes=1,8 --prompt_len=512 \
      --new_tokens=256 --reference --config.model.num_layers=8 --config.model.embed_dim=512 \
      --config.model.num_heads=8 --config.model.num_kv_heads=2 --config.model.head_dim=64 \
      --config.model.mlp_dim=1536 --config.model.vocab_size=4096 --config.model.sliding_window=256 \
      --config.model.block_size=256
"""
import statistics
import time

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from benchmarks.step import time_peer
from models import mistral, mistral_weights
from train import build

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A Mistral config.', lock_config=False)
_BATCHES = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Prompts per generate call.')
_PROMPT = flags.DEFINE_integer('prompt_len', 512, 'Prompt tokens per row.')
_NEW = flags.DEFINE_integer('new_tokens', 256, 'New tokens per row.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median) after one compile call.')
_PAIRS = flags.DEFINE_integer('pairs', 1, 'With --reference: (jax, torch) timings back to back, this many times.')
_REFERENCE = flags.DEFINE_bool('reference', False, "Also time HF MistralForCausalLM.generate in a fresh process.")


def time_generate(model, params, prompt) -> float:
  call = lambda: np.asarray(mistral.generate(model, params, prompt, _NEW.value))
  out = call()  # compiles the prefill and the decoding loop
  assert out.shape == (prompt.shape[0], _PROMPT.value + _NEW.value), out.shape
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  if config.model_name != 'mistral':
    raise app.UsageError(f'--config: generate is for Mistral configs, got model_name={config.model_name!r}')
  model = build.build_model(config)
  params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))['params']
  job = dict(spec='hf_mistral', mode='generate', max_new_tokens=_NEW.value,
             hf_config=mistral_weights.hf_config_from_kwargs(config.model.to_dict()))
  print(f'device: {jax.devices()[0].device_kind} | prompt {_PROMPT.value} tokens, {_NEW.value} new, greedy')
  for b in map(int, _BATCHES.value):
    prompt = np.random.default_rng(b).integers(1, config.model.vocab_size, (b, _PROMPT.value), np.int32)
    ratios = []
    for _ in range(_PAIRS.value if _REFERENCE.value else 1):
      seconds = time_generate(model, params, prompt)
      print(f'jax   batch {b}: {seconds * 1e3:.0f} ms/call | {b * _NEW.value / seconds:.1f} new tokens/s')
      if _REFERENCE.value:
        ref = time_peer(job, {'prompt': prompt}, _REPEATS.value)['median']
        ratios.append(ref / seconds)
        print(f'torch batch {b}: {ref * 1e3:.0f} ms/call | {b * _NEW.value / ref:.1f} new tokens/s | '
              f'jax/torch speed {ref / seconds:.2f}x')
    if len(ratios) > 1:
      print(f'batch {b}: jax/torch speed over {len(ratios)} pairs: median {statistics.median(ratios):.2f}x')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
