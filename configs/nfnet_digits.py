r"""A small NFNet on the UCI handwritten digits (8x8, shipped with scikit-learn): the CNN counterpart of
vit_digits, trained with the NFNet recipe (SGD + Nesterov, adaptive gradient clipping that spares the
classifier weight, coupled weight decay on weights only, an EMA with warmup for evaluation, label
smoothing) on 2 CPU cores in a few minutes, with no download.

  python -m train --config=configs/nfnet_digits.py --workdir=workdirs/nfnet_digits

The net keeps the 8x8 input through the stem (stride 1) and halves it in stages 2-4; every other
architectural detail (scaled WS convs, signal-propagation beta/alpha, SE, skip gains, stochastic
depth) is the full NFNet block.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'nfnet'
  c.model = dict(num_classes=10, widths=(32, 64, 128, 128), depths=(1, 1, 1, 1), stem_widths=(16, 32, 32, 16),
                 stem_strides=(1, 1, 1, 1), dropout=0.2, stochastic_depth=0.1, numerics='deepmind',
                 dtype='float32', conv_impl='taps')  # Bottlenecks under 128 wide are one group: same as native.
  c.task = dict(name='classification', label_smoothing=0.1)

  c.data = dict(name='digits', data_dir=common.optional(str), train_split='train', eval_split='test',
                pp_train='value_range(-1, 1)|keep("image", "label")',
                pp_eval='value_range(-1, 1)|keep("image", "label")', num_threads=2, prefetch=2)
  c.batch_size = 128
  c.eval_batch_size = 120
  c.total_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500

  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=True,
      agc_clip=0.01, agc_eps=1e-3, agc_exclude_params=r'head/kernel',
      weight_decay=5e-5, weight_decay_params=r'.*kernel',
      grad_clip_norm=common.optional(float),
      ema_decay=0.999, ema_warmup=True))
  c.schedule = common.schedule(base_learning_rate=0.4, warmup_steps=100)
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14
  return c
