r"""NFNet-F0..F7 (and the wider "+" variants) on ImageNet-1k: the paper's recipe at pod scale.

Recipe: Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization",
section 4 and Appendix: SGD with Nesterov momentum 0.9, batch 4096, learning rate 0.1 x batch/256 = 1.6
with 5 epochs of linear warmup from 0 then cosine decay to 0, 360 epochs; adaptive gradient clipping
(lambda 0.01, eps 1e-3, unit-wise) on every parameter except the classifier weight; weight decay 2e-5
added to the gradient, on weights only (not gains, biases or skip gains); label smoothing 0.1; an EMA
of the weights with decay min(0.99999, (1+t)/(10+t)) for evaluation; MixUp (alpha 0.2) on half of each
batch and CutMix on the other half, then RandAugment (4 layers, per-variant magnitude) on the mixed images
(each step draws 2 x batch source crops, as the reference does); dropout before the
classifier per variant; bf16 activations with float32 parameters. Training at the variant's train
resolution with random-resized crops and flips; evaluation at the variant's test resolution S resizes
to S+32 and centre-crops S.

  python -m train --config=configs/nfnet_i1k.py:variant=F0 --workdir=gs://BUCKET/nfnet_f0 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Any variant: `:variant=F3`, `:variant=F7+` (and `plus_stage1_width=paper` for the paper's 192-wide
stage-1 bottleneck instead of the public code's 128). Shrunk to run locally on prepared data:
`:variant=F0,runlocal=True`. The dataset is prepared once with
`tfds build imagenet2012 --data_dir=... --file_format=array_record --manual_dir=...`.
"""
import ml_collections

from configs import common

TRAIN_EXAMPLES = 1_281_167
# variant -> (train resolution, test resolution, RandAugment magnitude, dropout); from the paper's table.
VARIANTS = {
    'F0': (192, 256, 5, 0.2), 'F1': (224, 320, 10, 0.3), 'F2': (256, 352, 10, 0.4),
    'F3': (320, 416, 15, 0.4), 'F4': (384, 512, 15, 0.5), 'F5': (416, 544, 15, 0.5),
    'F6': (448, 576, 15, 0.5), 'F7': (480, 608, 15, 0.5),
}
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='F0', runlocal=False, epochs=360, plus_stage1_width='public')
  base = arg.variant.rstrip('+')
  if base not in VARIANTS:
    raise ValueError(f'variant {arg.variant!r} is unknown; use F0..F7 or F0+..F7+.')
  train_res, eval_res, magnitude, dropout = VARIANTS[base]  # Trained at one resolution, tested at a higher.

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'nfnet'
  c.model = dict(variant=arg.variant, num_classes=1000, dropout=dropout, stochastic_depth=0.25,
                 numerics='deepmind', plus_stage1_width=arg.plus_stage1_width, dtype='bfloat16',
                 conv_impl='auto')  # taps on CPU, native on TPU and GPU (models/nfnet.resolve_conv_impl).
  c.task = dict(name='classification', label_smoothing=0.1)

  normalize = f'standardize({MEAN_RGB}, {STDDEV_RGB})'
  c.data = dict(
      name='imagenet2012', data_dir=common.optional(str), train_split='train', eval_split='validation',
      pp_train=f'decode|inception_crop({train_res})|flip_lr|onehot(1000)|keep("image", "labels")',
      pp_eval=f'decode|resize({eval_res + 32})|central_crop({eval_res})|{normalize}|keep("image", "label")',
      # As in the reference: mix pairs of crops first, then RandAugment and normalise each mixed image.
      mix=dict(mixup_alpha=0.2, cutmix_alpha=1.0, pp_after=f'randaugment(4, {magnitude})|{normalize}'),
      num_threads=32, prefetch=4)
  c.batch_size = 4096
  c.eval_batch_size = 4096
  steps_per_epoch = TRAIN_EXAMPLES // c.batch_size
  c.total_steps = arg.epochs * steps_per_epoch
  c.log_every_steps = 100
  c.eval_every_steps = 5 * steps_per_epoch
  c.checkpoint_every_steps = 1000

  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=True,
      agc_clip=0.01, agc_eps=1e-3, agc_exclude_params=r'head/kernel',
      weight_decay=2e-5, weight_decay_params=r'.*kernel',  # Not gains, biases or skip gains.
      grad_clip_norm=common.optional(float),
      ema_decay=0.99999, ema_warmup=True))
  c.schedule = common.schedule(base_learning_rate=0.1 * c.batch_size / 256, warmup_steps=5 * steps_per_epoch)
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.runlocal:
    c.batch_size = c.eval_batch_size = 16
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule.warmup_steps = 5
    c.model.dtype = 'float32'
    c.data.update(eval_split='validation[:64]', num_threads=2, prefetch=1)
  return c
