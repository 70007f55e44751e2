r"""Zephyr's distilled DPO (dDPO) of Mistral-7B at pod scale: the dSFT model trained on UltraFeedback-binarized pairs
(prompt, chosen, rejected message lists; data/preference_data.py), Zephyr's chat template, bf16, FSDP x tensor.

Recipes (`recipe=`):
  paper     Tunstall et al. 2023, §4.4: beta 0.1, AdamW without weight decay, peak learning rate 5e-7 with 10%
            warmup and linear decay, global batch 32 pairs, 3 epochs (the released Zephyr-7B-alpha's length).
  handbook  (default) alignment-handbook recipes/zephyr-7b-beta/dpo/config_full.yaml, which gives zephyr-7b-beta on
            the corrected UltraFeedback: beta 0.01, learning rate 5e-7, 10% warmup and cosine decay, 1 epoch,
            8 pairs per device x 2 accumulation steps (128 pairs on the handbook's 8 GPUs), max_length 1024,
            max_prompt_length 512.
The reference is a frozen copy of the starting parameters (config.frozen.reference = 'init', sharded like them,
never checkpointed). `:lora=128` or `:qlora=128` is the handbook's dpo/config_qlora.yaml: rank 128, alpha 128,
dropout 0.05 on all seven projections, learning rate 5e-6, the base in bf16 or NF4; the reference is then the same
base with the adapters off (no second copy).

  python -m train --config=configs/zephyr_ddpo.py:init=gs://BUCKET/runs/zephyr_dsft,tokenizer=/models/tokenizer.model \
      --workdir=gs://BUCKET/runs/zephyr_ddpo --config.data.files='gs://BUCKET/ultrafeedback_binarized/train_prefs*.jsonl'
  python -m train --config=configs/zephyr_ddpo.py:init=gs://BUCKET/zephyr_7b_sft,recipe=paper ...  # imported weights

`init` is a dSFT workdir (configs/zephyr_dsft.py) or a model imported with `python -m train.convert import` (its
tokenizer.model is the default tokenizer; a workdir needs `tokenizer=`). What each device would hold, without
allocating (virtual CPU devices standing in for a v4-32's 16 chips, and a v5e-8's 8 for the adapters):
  JAX_NUM_CPU_DEVICES=16 python -m train --config=configs/zephyr_ddpo.py --dry_run --hardware=tpu_v4
  JAX_NUM_CPU_DEVICES=8 python -m train --config=configs/zephyr_ddpo.py:qlora=128 --dry_run --hardware=tpu_v5e
`microbatches=` sets the gradient-accumulation steps (default: 8 rows of 1024 tokens per device and step on those
slices); the global batch stays the recipe's.
"""
import ml_collections

from configs import common, mistral_7b

RECIPES = {
    'paper': dict(beta=0.1, learning_rate=5e-7, decay='linear', batch_size=32, epochs=3.0),
    'handbook': dict(beta=0.01, learning_rate=5e-7, decay='cosine', batch_size=128, epochs=1.0),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, init='', tokenizer='', recipe='handbook', lora=0, qlora=0, microbatches=0)
  if arg.recipe not in RECIPES:
    raise ValueError(f'recipe={arg.recipe!r} is unknown; choose one of {sorted(RECIPES)}.')
  if arg.lora and arg.qlora:
    raise ValueError('choose one of lora=R and qlora=R.')
  recipe = RECIPES[arg.recipe]
  c = mistral_7b.get_config(f'init={arg.init}' if arg.init else None)
  tokenizer = arg.tokenizer or (f'{arg.init}/tokenizer.model' if arg.init else 'bytes')
  c.data = ml_collections.ConfigDict(dict(
      format='preference', files=common.optional(str), on_bad_line='error', data_dir=common.optional(str),
      template='zephyr', tokenizer=tokenizer, max_length=1024, max_prompt_length=512, train_split='train',
      eval_split='validation', num_threads=16, prefetch=4, num_train_examples=common.optional(int)))
  c.task = ml_collections.ConfigDict(dict(name='preference', loss='sigmoid', beta=recipe['beta'], label_smoothing=0.0,
                                          reference='frozen'))
  c.frozen = ml_collections.ConfigDict({'reference': 'init'})
  c.batch_size = c.eval_batch_size = recipe['batch_size']
  # Every layer rematerialised (only its input kept): a pair is two rows of 1024 tokens, and the policy's backward
  # and the reference's forward both run in the step. The microbatches (a gradient-accumulation step each) keep a
  # device's share of the batch to 8 rows of 1024 tokens on a v4-32 (16 chips as fsdp=4 x tensor=4).
  c.model.remat = 'full'
  c.microbatches = arg.microbatches or max(1, recipe['batch_size'] // 16)
  c.total_steps = 0  # from the budget
  c.budget = dict(epochs=recipe['epochs'], core_hours=common.optional(float), hardware='tpu_v4',
                  mfu=common.optional(float))
  c.optimizer = common.adamw(weight_decay=0.0, grad_clip_norm=1.0)  # TRL's (Trainer's) default
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=recipe['learning_rate'], warmup_fraction=0.1,
                                              decay=recipe['decay'], end_learning_rate=0.0))
  c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 100, 100, 10
  c.eval_at_start = True
  rank = arg.lora or arg.qlora
  if rank:
    c.adapter = common.adapter('qlora' if arg.qlora else 'lora', rank=rank, alpha=float(rank), dropout=0.05,
                               base_dtype='bfloat16')
    c.task.reference = 'adapters_off'
    del c.frozen
    c.schedule.base_learning_rate = 5e-6
    # A v5e-8 holds the adapters' runs (8 chips as fsdp=2 x tensor=4): 8 rows per device and microbatch.
    c.microbatches = arg.microbatches or max(1, recipe['batch_size'] // 8)
  return c
