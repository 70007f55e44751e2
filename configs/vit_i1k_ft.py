r"""A ViT pretrained elsewhere (JFT-4B, ImageNet-21k; configs/vit_at_scale.py) finetuned on ImageNet-1k.

What the papers say, and where:
  Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", section 3.2: drop the pretrained head and attach a
  zero-initialised linear layer of the new class count; finetune at a higher resolution with the same patch
  size, 2-D interpolating the position embeddings to the new patch grid. Appendix B.1.1 / Table 4: SGD with
  momentum 0.9, batch 512, cosine decay, no weight decay, gradient clipping at global norm 1, 384 px;
  ImageNet 20,000 steps with the learning rate chosen from {0.003, 0.01, 0.03, 0.06} on a 2% held-out split of
  the training set.
  Zhai et al. 2022, "Scaling Vision Transformers", Appendix D: the same recipe with 500 warmup steps; 384 px
  for models below ViT-g, 518 px for g and G; Polyak averaging only for G, whose learning rate is flat after
  the warmup instead of cosine.
  big_vision configs/transfer.py: momentum with grad_clip_norm 1.0, wd None, batch 512, 500 warmup steps, 20k
  steps for ImageNet, best learning rate 0.03; the head reset to its zero init (`dont_load` head/kernel and
  head/bias); position embeddings resampled with scipy's order-1 zoom; ImageNet minival train[99%:] (training
  on train[:99%]), validation only reported; eval resize_small(448)|central_crop(384).

Our choices: the learning rate 0.03 as default (`:lr=...` for the grid {0.003, 0.01, 0.03, 0.06}); the EMA
decay of G is 0.9999 (ViT paper, Table 2's Polyak averaging); a patch size that does not divide 384 or 518
trains at the nearest multiple below (/14 below g: 378); evaluation resizes the short side to 7/6 of the
resolution then centre-crops it (big_vision's 448 -> 384); train crops are random-resized crops + flips, and
the pixels are in [-1, 1], as in the pretraining pipeline (configs/common.py study_image_data); the model
kwargs are the study's pretraining ones, so its checkpoints load.

The pretrained head is excluded (init_params_exclude='head/.*') and takes this run's zero init; every other
parameter is loaded, the position embedding resampled from the pretraining patch grid (224 / 14 = 16x16) to
this run's (378 / 14 = 27x27) by `init_params_posemb`: 'bilinear' (big_vision's way, the default) or
'bicubic' (timm's resample_abs_pos_embed: antialiased bicubic).

  python -m train --config=configs/vit_i1k_ft.py:variant=So400m/14 --workdir=gs://BUCKET/study/So400m-14_1ep/finetune \
      --config.init_params=gs://BUCKET/study/So400m-14_1ep --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`init_params` is a pretraining workdir (its latest checkpoint) or a model imported with `python -m train.convert
import`. Any variant: `:variant=B/16` (384 px), `:variant=g/14` (518 px); another rate: `:lr=0.01`. Shrunk to
run locally on prepared data (2 blocks, batch 16, 20 steps, 64 images per evaluator; it finetunes a
`configs/vit_at_scale.py:runlocal=True` run, whose blocks are not scanned either):
  python -m train --config=configs/vit_i1k_ft.py:runlocal=True --workdir=/tmp/vit_ft \
      --config.init_params=/tmp/vit_pretrain
"""
import ml_collections

from configs import common

TRAIN_EXAMPLES = 1_281_167
LEARNING_RATES = (0.003, 0.01, 0.03, 0.06)  # the ViT paper's ImageNet grid (Table 4)


def resolution(variant: str) -> int:
  """384 px below ViT-g, 518 px for g and G (Zhai et al. App. D), rounded down to a multiple of the patch."""
  name, _, patch = variant.partition('/')
  target = 518 if name in ('g', 'G') else 384
  return target - target % int(patch or 16)


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='So400m/14', runlocal=False, lr=0.03, steps=20_000)
  res = resolution(arg.variant)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = dict(num_classes=1000, variant=arg.variant, posemb='learn', pool_type='tok', dropout=0.0,
                 head_zeroinit=True, dtype='bfloat16', scan=True, remat=True)
  c.task = dict(name='classification', label_smoothing=0.0)
  c.init_params = common.optional(str)  # a pretraining workdir or an imported model: given on the command line
  c.init_params_exclude = 'head/.*'
  c.init_params_posemb = 'bilinear'

  train_split, minival = common.minival_splits('train', 1)
  c.data = dict(
      name='imagenet2012', data_dir=common.optional(str), train_split=train_split, eval_split='validation',
      pp_train=f'decode|inception_crop({res})|flip_lr|value_range(-1, 1)|keep("image", "label")',
      pp_eval=f'decode|resize_small({res * 7 // 6})|central_crop({res})|value_range(-1, 1)|keep("image", "label")',
      num_train_examples=round(TRAIN_EXAMPLES * 0.99), num_threads=32, prefetch=4)
  c.evals = dict(minival=dict(split=minival), val=dict(split='validation'))
  c.batch_size = 512
  c.eval_batch_size = 512
  c.total_steps = arg.steps
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000

  is_giant = arg.variant.startswith('G/')
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=False, weight_decay=0.0, grad_clip_norm=1.0,
      ema_decay=common.optional(float, 0.9999 if is_giant else None), ema_warmup=False, sam_rho=common.optional(float)))
  c.schedule = common.schedule(base_learning_rate=arg.lr, warmup_steps=500, decay='constant' if is_giant else 'cosine')
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.runlocal:  # As configs/vit_at_scale.py:runlocal=True, whose runs this finetunes.
    c.model.update(depth=2, dtype='float32', scan=False, remat=False)
    c.data.update(num_threads=2, prefetch=1)
    c.evals = dict(minival=dict(split='train[-64:]'), val=dict(split='validation[:64]'))
    c.batch_size = c.eval_batch_size = 16
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule.warmup_steps = 5
  return c
