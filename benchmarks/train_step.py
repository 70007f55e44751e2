r"""Times the jitted train step of any config, optionally beside the same architecture in PyTorch.

Prints examples/s or tokens/s (median over timed steps after compilation), the step's FLOPs from XLA's cost analysis,
the achieved FLOP/s and its ratio to this machine's measured float32 matmul peak. With --reference it then
times a forward+backward+AdamW step of timm or HF transformers on the same batch in a fresh process
(benchmarks/torch_peer.py), back to back with ours, --pairs times.

  python -m benchmarks.train_step --config=configs/vit_i1k.py --batch_size=4 --image_size=224 \
      --reference=timm:vit_base_patch16_224 --config.model.dtype=float32 --config.model.scan=False \
      --config.model.remat=False --config.model.dropout=0.0

Language models get batches of random tokens (one document per row) of --seq_len; the small Mistral of
issue 4 beside HF's MistralForCausalLM:

  python -m benchmarks.train_step --config=configs/mistral_tiny.py --batch_size=4 --seq_len=1024 \
      --reference=hf_mistral --config.model.num_layers=8 --config.model.embed_dim=512 \
      --config.model.num_heads=8 --config.model.num_kv_heads=2 --config.model.head_dim=64 \
      --config.model.mlp_dim=1536 --config.model.vocab_size=4096 --config.model.sliding_window=256 \
      --config.model.block_size=256

--profile_dir=DIR writes a jax.profiler trace of the timed steps to DIR (`tensorboard --logdir=DIR`, or
DIR/plugins/profile/*/perfetto_trace.json.gz in ui.perfetto.dev).

Any `--config.*` override applies. XLA's cost analysis counts the body of a loop once, so benchmark FLOPs
with `--config.model.scan=False` (the step time itself is valid either way).
"""
import statistics

from absl import app, flags
import jax
from ml_collections import config_flags

from benchmarks.step import compile_step, time_peer
from models import mistral_weights
from train import loop, objectives
from train.compute import matmul_peak_flops

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file to benchmark.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Global batch size.')
_IMAGE = flags.DEFINE_integer('image_size', 224, 'Square input resolution.')
_CHANNELS = flags.DEFINE_integer('channels', 3, 'Input channels.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (after one compile step).')
_DEVICES = flags.DEFINE_integer('devices', 1, 'Devices to shard over (mesh data axis).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'Tokens per row (language-model configs).')
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None, 'Write a jax.profiler trace of the timed jax steps here '
                                   '(as config.profile_steps does in a run): TensorBoard profile plugin, Perfetto.')
_PAIRS = flags.DEFINE_integer('pairs', 1, 'With --reference: time (jax, torch) this many times back to back; '
                              'each pair gives a ratio (the speed of the machine drifts between pairs).')
_REFERENCE = flags.DEFINE_string('reference', None, "timm:MODEL_NAME, or 'hf_vit' / 'hf_mistral' (HF model of "
                                 "the config's shape).")


def reference_job(spec: str, config) -> dict:
  """What benchmarks/torch_peer.py needs to build the same architecture in PyTorch."""
  job = dict(spec=spec, mode='train', num_classes=config.model.get('num_classes'), channels=_CHANNELS.value,
             image_size=_IMAGE.value)
  if spec == 'hf_mistral':
    job['hf_config'] = mistral_weights.hf_config_from_kwargs(config.model.to_dict())
  elif spec == 'hf_vit':
    d = loop.build_model(config).dims()
    job['vit_dims'] = dict(width=d['width'], depth=d['depth'], num_heads=d['num_heads'], mlp_dim=d['mlp_dim'],
                           patch_size=d['patch_size'][0])
  elif not spec.startswith('timm:'):
    raise app.UsageError(f'--reference={spec!r}: use timm:MODEL_NAME, hf_vit or hf_mistral.')
  return job


def main(argv):
  del argv
  config = _CONFIG.value
  config.batch_size = config.eval_batch_size = _BATCH.value
  objective = objectives.make_objective(config.task)
  # The objective makes a batch of its own shape: token rows for language models, images for classifiers.
  input_shape = objective.example_shape(_IMAGE.value, _CHANNELS.value, _SEQ_LEN.value)
  batch = objective.synthetic_batch(config, _BATCH.value, input_shape)
  unit = objective.unit
  per_step = _BATCH.value * (input_shape[0] if unit == 'tokens' else 1)
  peak = matmul_peak_flops()
  job = reference_job(_REFERENCE.value, config) if _REFERENCE.value else None
  step = compile_step(config, batch, jax.devices()[:_DEVICES.value])
  cost = step.compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  print(f'device: {jax.devices()[0].device_kind} x{_DEVICES.value} | matmul peak {peak / 1e9:.1f} GFLOP/s (float32)')
  if config.model.get('scan'):
    print('note: the model is scanned; XLA counted one loop iteration, so FLOPs are undercounted '
          '(rerun with --config.model.scan=False for the FLOP figures)')
  ratios = []
  for pair in range(_PAIRS.value if job else 1):
    seconds = step.time(_STEPS.value, profile_dir=_PROFILE_DIR.value if pair == 0 else None)
    print(f'jax   {config.model_name}: {seconds * 1e3:.1f} ms/step | {per_step / seconds:.2f} {unit}/s | '
          f'{flops / 1e9:.4g} GFLOP/step (XLA) | {flops / seconds / 1e9:.1f} GFLOP/s | '
          f'{100 * flops / seconds / peak:.1f}% of peak')
    if job:
      ref = time_peer(job, batch, _STEPS.value)['median']
      ratios.append(ref / seconds)
      print(f'torch {_REFERENCE.value}: {ref * 1e3:.1f} ms/step | {per_step / ref:.2f} {unit}/s | '
            f'{flops / ref / 1e9:.1f} GFLOP/s at the same FLOPs | jax/torch speed {ref / seconds:.2f}x')
  if len(ratios) > 1:
    print(f'jax/torch speed over {len(ratios)} pairs: median {statistics.median(ratios):.2f}x '
          f'(min {min(ratios):.2f}x, max {max(ratios):.2f}x)')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
