r"""Zephyr's distilled SFT (dSFT) of Mistral-7B at pod scale: UltraChat-style chat JSONL, the loss on the
assistant's replies only, Zephyr's chat template, bf16, layers scanned and rematerialised, FSDP x tensor.

Recipe (Tunstall et al. 2023, §4.3; alignment-handbook recipes/zephyr-7b-beta/sft/config_full.yaml): Mistral-7B
v0.1, 1 epoch of UltraChat-200k, AdamW without weight decay, peak learning rate 2e-5 with 10% warmup and cosine
decay, global batch 512 packed rows of 2048 tokens; no LoRA. `:lora=16` is the handbook's LoRA variant
(sft/config_qlora.yaml without the 4-bit base: rank 16, alpha 16, dropout 0.05 on all seven projections,
learning rate 2e-4; the frozen base in bf16, as the handbook loads it); configs/mistral_qlora.py is the QLoRA paper's recipe.

  python -m train.convert import --src=/models/Mistral-7B-v0.1 --out=gs://BUCKET/mistral_7b_v01 --scan
  python -m train --config=configs/zephyr_dsft.py:init=gs://BUCKET/mistral_7b_v01 \
      --workdir=gs://BUCKET/runs/zephyr_dsft --config.data.files='gs://BUCKET/ultrachat_200k/train*.jsonl'

What each device would hold, without allocating (8 virtual CPU devices for a v5e-8's chips):
  JAX_NUM_CPU_DEVICES=8 python -m train --config=configs/zephyr_dsft.py --dry_run --hardware=tpu_v5e

One epoch is counted from the data at start (its conversations packed once); give --config.data.num_train_examples
(packed rows) to skip that. Shrunk to run locally with the same structure (the embedded chat/stdlib set, byte
tokens, 2 scanned layers on 8 CPU devices as fsdp=2 x tensor=4):
  python -m train --config=configs/zephyr_dsft.py:runlocal=True --workdir=/tmp/zephyr_dsft_local
"""
import ml_collections

from configs import common, mistral_7b


def get_config(arg=None):
  arg = common.parse_arg(arg, init='', runlocal=False, lora=0)
  c = mistral_7b.get_config(f'init={arg.init},runlocal={arg.runlocal}' if arg.init else f'runlocal={arg.runlocal}')
  tokenizer = c.data.tokenizer
  c.data = ml_collections.ConfigDict(dict(
      format='chat', name='chat/stdlib', files=common.optional(str), on_bad_line='error', template='zephyr',
      data_dir=common.optional(str), train_split='train', eval_split='validation', tokenizer=tokenizer, seq_len=2048,
      packing='first_fit', packing_bins=64, num_threads=16, prefetch=4, num_train_examples=common.optional(int)))
  c.batch_size = c.eval_batch_size = 512
  c.total_steps = 0  # from the budget: one epoch
  c.budget = dict(epochs=1.0, core_hours=common.optional(float), hardware='tpu_v4', mfu=common.optional(float))
  c.optimizer = common.adamw(weight_decay=0.0, grad_clip_norm=1.0)
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=2e-5, warmup_fraction=0.1, decay='cosine',
                                              end_learning_rate=0.0))
  c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 100, 100, 10
  c.eval_at_start = bool(arg.init)
  if arg.lora:
    c.adapter = common.adapter('lora', rank=arg.lora, alpha=float(arg.lora), dropout=0.05, base_dtype='bfloat16')
    c.schedule.base_learning_rate = 2e-4
  if arg.runlocal:
    c.data.update(tokenizer='bytes', seq_len=128, num_threads=1, prefetch=1, packing_bins=4)
    c.batch_size = c.eval_batch_size = 8
    c.budget = None
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule = common.schedule(base_learning_rate=1e-3, warmup_steps=2)
  return c
