r"""QLoRA finetuning of Mistral-7B at pod scale on chat data, with the QLoRA paper's recipe: the frozen base in NF4
with double quantisation (train/nf4.py), LoRA factors of rank 64 on every projection, bf16 compute.

Recipe (Dettmers et al. 2023, appendix B; artidoro/qlora's finetune_guanaco_7b.sh): rank 64, alpha 16, dropout
0.1 on all linear layers of the blocks, AdamW (beta2 0.999, no weight decay), learning rate 2e-4 constant after a
3% warmup, gradient clipping at 0.3, batch 16, 1,875 steps; targets of up to 512 tokens. Here on the same chat
JSONL as configs/zephyr_dsft.py (Guanaco used OASST1), Zephyr's template, rows of 1024 tokens; the rest of the
frozen base (embeddings, head, norms) in bf16.

  python -m train --config=configs/mistral_qlora.py:init=gs://BUCKET/mistral_7b_v01 \
      --workdir=gs://BUCKET/runs/mistral_qlora --config.data.files='gs://BUCKET/ultrachat_200k/train*.jsonl'
  python -m train.convert export_peft --src=gs://BUCKET/runs/mistral_qlora --out=/models/mistral_qlora_adapter

Shrunk to run locally (the embedded chat/stdlib set, byte tokens, 2 scanned layers on 8 CPU devices):
  python -m train --config=configs/mistral_qlora.py:runlocal=True --workdir=/tmp/mistral_qlora_local
"""
import ml_collections

from configs import common, zephyr_dsft


def get_config(arg=None):
  arg = common.parse_arg(arg, init='', runlocal=False)
  c = zephyr_dsft.get_config(f'init={arg.init},runlocal={arg.runlocal}' if arg.init else f'runlocal={arg.runlocal}')
  c.adapter = common.adapter('qlora', rank=64, alpha=16.0, dropout=0.1, base_dtype='bfloat16')
  c.optimizer = common.adamw(weight_decay=0.0, grad_clip_norm=0.3, b2=0.999)
  c.budget = None
  c.total_steps = 1875
  c.batch_size = c.eval_batch_size = 16
  c.data.seq_len = 1024
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=2e-4, warmup_fraction=0.03, decay='constant',
                                              end_learning_rate=2e-4))
  c.eval_every_steps, c.checkpoint_every_steps = 200, 200
  if arg.runlocal:
    c.data.update(seq_len=128)
    c.adapter.rank = 8
    c.batch_size = c.eval_batch_size = 8
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule = common.schedule(base_learning_rate=3e-3, warmup_steps=2)
  return c
