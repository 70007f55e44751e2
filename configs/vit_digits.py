r"""A CPU-sized ViT on the UCI handwritten digits that ship with scikit-learn: the embedded default job.

8x8 grayscale digits in 2x2 patches (16 tokens), a 4-block ViT of width 64; about 95%+ test accuracy
(360 held-out digits) in a few minutes on 2 CPU cores, with no download.

  python -m train --config=configs/vit_digits.py --workdir=workdirs/vit_digits

Shrink it further for a smoke run: --config.total_steps=50 --config.eval_every_steps=50
"""
import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = dict(num_classes=10, width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2,
                 posemb='learn', pool_type='gap', dropout=0.0, dtype='float32', scan=False, remat=False)
  c.task = dict(name='classification', label_smoothing=0.0)

  c.data = dict(name='digits', data_dir=common.optional(str), train_split='train', eval_split='test',
                pp_train='value_range(-1, 1)|keep("image", "label")',
                pp_eval='value_range(-1, 1)|keep("image", "label")',
                num_threads=2, prefetch=2)
  c.batch_size = 128
  c.eval_batch_size = 128
  c.total_steps = 1500
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500

  c.optimizer = common.adamw(weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = common.schedule(base_learning_rate=2e-3, warmup_steps=100, decay='cosine')
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14
  return c
