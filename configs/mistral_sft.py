r"""Supervised finetuning (SFT) of a CPU-sized Mistral on the embedded instruction set, Zephyr's first step in
miniature: the loss on the assistant's replies only, with NEFTune, LoRA or QLoRA by argument.

Data: `chat/stdlib` (data/chat_data.py), conversations made from the running Python's standard library (write
the function from its docstring, or explain it then write it), in Zephyr's chat template, byte tokens, packed
first-fit into rows of 512 tokens. The model is configs/mistral_tiny.py's (4 layers of width 128, window 64),
from scratch, or from a run of that config on the standard-library sources with `init=DIR`.

  python -m train --config=configs/mistral_sft.py --workdir=workdirs/mistral_sft                    # full SFT
  python -m train --config=configs/mistral_sft.py:neftune=5 --workdir=workdirs/mistral_sft_neftune  # NEFTune
  python -m train --config=configs/mistral_sft.py:lora=16 --workdir=workdirs/mistral_sft_lora       # LoRA r=16
  python -m train --config=configs/mistral_sft.py:qlora=64 --workdir=workdirs/mistral_sft_qlora     # QLoRA r=64
  python -m train --config=configs/mistral_tiny.py --workdir=workdirs/mistral_tiny   # then, from it:
  python -m train --config=configs/mistral_sft.py:init=workdirs/mistral_tiny --workdir=workdirs/mistral_sft_pt
  python -m train.sample --workdir=workdirs/mistral_sft --chat="Write a Python function \`add(a, b)\`: ..."

Arguments combine (`:neftune=5,lora=16`). NEFTune's alpha 5 is the paper's usual value; LoRA takes alpha 2r and
dropout 0.05, QLoRA the Guanaco recipe's alpha 16 and dropout 0.1 (QLoRA paper, appendix B); the adapters use a
learning rate 3x the full finetune's, as low-rank updates of small models want.
"""
import ml_collections

from configs import common, mistral_tiny


def get_config(arg=None):
  arg = common.parse_arg(arg, neftune=0.0, lora=0, qlora=0, init='', steps=300)
  if arg.lora and arg.qlora:
    raise ValueError('choose one of lora=R and qlora=R.')
  c = mistral_tiny.get_config()
  c.init_params = common.optional(str, arg.init or None)
  c.model.update(embed_noise_alpha=float(arg.neftune), embed_noise_length='segment')
  c.data = ml_collections.ConfigDict(dict(
      format='chat', name='chat/stdlib', files=common.optional(str), on_bad_line='error', template='zephyr',
      data_dir=common.optional(str), train_split='train', eval_split='validation', tokenizer='bytes', seq_len=512,
      packing='first_fit', packing_bins=16, num_threads=2, prefetch=2))
  c.batch_size = c.eval_batch_size = 8
  c.total_steps = arg.steps
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.eval_at_start = True
  c.checkpoint_every_steps = 100
  learning_rate = 1e-3
  if arg.lora:
    c.adapter = common.adapter('lora', rank=arg.lora, alpha=2.0 * arg.lora, dropout=0.05)
    learning_rate *= 3
  elif arg.qlora:
    c.adapter = common.adapter('qlora', rank=arg.qlora, alpha=16.0, dropout=0.1)
    learning_rate *= 3
  c.schedule = common.schedule(base_learning_rate=learning_rate, warmup_steps=max(1, arg.steps // 10))
  c.optimizer = common.adamw(weight_decay=0.0, grad_clip_norm=1.0)
  return c
