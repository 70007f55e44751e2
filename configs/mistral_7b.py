r"""Mistral 7B v0.1 shapes at pod scale: bf16 compute, layers scanned and rematerialised, FSDP x tensor.

7,241,732,096 parameters: 32 layers, embed 4096, 32 query heads sharing 8 K/V heads of 128, SwiGLU MLP
14336, vocabulary 32000, sliding window 4096 over sequences of 8192, rope_theta 1e4 (v0.1).

Finetune the released weights (import once, shard by shard, then train from them):
  python -m train.convert import --src=/models/Mistral-7B-v0.1 --out=gs://BUCKET/mistral_7b_v01 --scan
  python -m train --config=configs/mistral_7b.py:init=gs://BUCKET/mistral_7b_v01 \
      --workdir=gs://BUCKET/runs/mistral_7b_ft --config.data.files='gs://BUCKET/corpus/*.txt'

From scratch (no init; the tokenizer is any SentencePiece .model of 32000 pieces, e.g. Mistral's):
  python -m train --config=configs/mistral_7b.py:tokenizer=/models/tokenizer.model \
      --workdir=gs://BUCKET/runs/mistral_7b --config.data.files='gs://BUCKET/corpus/*.txt'

Memory: f32 parameters, AdamW moments and gradients are 16 bytes x 7.24B = 116 GB, split over the fsdp x tensor
devices (a v4-64's 32 chips: 3.6 GB each) plus bf16 activations of the saved projections. The mesh is
data=1, fsdp=-1 (all devices), tensor=4 (8 K/V heads split in 4; query heads, MLP and vocabulary too).

Long context (`:context=N`, e.g. 131072): rows of N tokens split over a `sequence` mesh axis of N / 8192 devices
(8,192 tokens each; the sliding window takes the 4,095 keys before each shard from its neighbour, a halo that does
not grow with N), tensor=4 within, fsdp over the rest; 16 rows of N tokens per step, one row per micro-batch
and group of sequence x tensor devices. Its bytes per device on a
v5p-128 (64 chips), without allocating anything:
  JAX_NUM_CPU_DEVICES=64 python -m train --config=configs/mistral_7b.py:context=131072 --dry_run --hardware=tpu_v5p

Shrunk to run locally with the same structure (2 scanned, rematerialised bf16 layers on 8 CPU devices as
fsdp=2 x tensor=4, byte tokens, the embedded standard-library corpus):
  python -m train --config=configs/mistral_7b.py:runlocal=True --workdir=/tmp/mistral_7b_local
"""
import ml_collections

from configs import common

LONG_SHARD = 8192  # tokens of a row per device with `context`: the rows' length at 4k-16k contexts on one device
SHAPES = dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
              sliding_window=4096, vocab_size=32000, norm_eps=1e-5, rope_theta=10_000.0, tie_embeddings=False)


def get_config(arg=None):
  arg = common.parse_arg(arg, init='', tokenizer='', runlocal=False, context=0)
  finetune = bool(arg.init)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'mistral'
  c.init_params = common.optional(str, arg.init or None)
  c.model = dict(**SHAPES, dtype='bfloat16', scan=True, remat='save_proj', attention_impl='blockwise',
                 block_size=512)
  c.task = dict(name='language_model')

  tokenizer = arg.tokenizer or (f'{arg.init}/tokenizer.model' if finetune else 'bytes')
  c.data = dict(format='packed_text', name='local_text/stdlib', files=common.optional(str),
                data_dir=common.optional(str), train_split='train', eval_split='validation',
                tokenizer=tokenizer, seq_len=8192, num_threads=16, prefetch=4,
                grow_length=common.optional(tuple))  # GrowLength, e.g. ((0, 1024), (20_000, 8192))
  # Pre-training: 4M tokens per step; finetuning: 0.5M.
  c.batch_size = 64 if finetune else 512
  c.eval_batch_size = c.batch_size
  c.total_steps = 2_000 if finetune else 250_000
  c.log_every_steps = 10
  c.eval_every_steps = 500 if finetune else 5_000
  c.checkpoint_every_steps = 250 if finetune else 1_000
  c.checkpoints_to_keep = 2
  c.eval_at_start = finetune  # the imported model's validation loss before finetuning

  c.optimizer = common.adamw(weight_decay=0.1, grad_clip_norm=1.0, b2=0.95, eps=1e-5)
  c.schedule = common.schedule(base_learning_rate=1e-5 if finetune else 3e-4,
                               warmup_steps=100 if finetune else 2_000)
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=1, fsdp=-1, tensor=4)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.context:
    if arg.context % LONG_SHARD:
      raise ValueError(f'context={arg.context} is not a multiple of {LONG_SHARD} (the tokens one device holds).')
    c.data.seq_len = arg.context
    c.batch_size = c.eval_batch_size = 16
    # A row spans sequence x tensor devices: one row at a time through each group (what bounds the activations).
    c.microbatches = 16
    c.mesh = common.mesh(data=1, fsdp=-1, sequence=arg.context // LONG_SHARD, tensor=4)
  if arg.runlocal:
    c.model.update(embed_dim=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=128,
                   sliding_window=32, vocab_size=320, block_size=32)
    c.data.update(tokenizer='bytes', seq_len=128, num_threads=2, prefetch=1)
    c.batch_size = c.eval_batch_size = 8
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule.warmup_steps = 5
    c.mesh = common.mesh(data=1, fsdp=-1, tensor=4)
  return c
