r"""An NFNet pretrained elsewhere (JFT-4B in the paper, configs/convnets_at_scale.py) finetuned on ImageNet-1k.

What the papers say, and where:
  Smith et al. 2023, "ConvNets Match Vision Transformers at Scale" (arXiv 2310.16764), its third section
  "Fine-tuned NFNets are competitive with Vision Transformers on ImageNet" (unnumbered) and Fig. 1:
    50 epochs of ImageNet finetuning; SAM "with stochastic depth and dropout"; train at 384x384, evaluate at
    480x480; for the best run, repeated augmentation with multiplicity 4 (Hoffer et al. 2019; Fort et al.
    2021), footnote 4: "we reduce the number of passes through the data such that the total computational
    cost of fine-tuning is constant". It gives no batch size, learning rate, schedule, rates or decay.
  Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization" (arXiv
  2102.06171), Appendix A.5 "Large Scale Pre-Training Details" (the NFNet JFT-300M -> ImageNet finetune):
    batch 2048; learning rate 0.1 with 5,000 steps of linear warmup from 0, then cosine decay to 0; SAM with
    rho 0.05; weight decay 1e-5; dropout 0.25; stochastic depth 0.1; an EMA of the parameters with decay
    warmup min(decay, (1 + t) / (10 + t)); the decay itself, 0.9999, is the ResNet finetune's of the same
    appendix. Its 15,000 steps are replaced here by Smith et al.'s 50 epochs.
  Brock et al. 2021 sections 4 and 6.2 (and configs/nfnet_i1k.py): SGD with Nesterov momentum 0.9 and
  adaptive gradient clipping 0.01 sparing the classifier; A.5 says the finetune optimiser is SGD, not more.

Our choices where both are silent: the optimiser details above (Nesterov, AGC 0.01 as in pretraining, decay on
weights only); no label smoothing, MixUp or RandAugment (A.5 lists its regularisers and these are not among
them); the pixels in [-1, 1] and random-resized crops + flips of the pretraining pipeline (configs/common.py
study_image_data: finetuning must see inputs as pretraining did); evaluation resizes to 480 + 32 and
centre-crops 480 (configs/nfnet_i1k.py's rule); the minival train[99%:] (big_vision's; training uses
train[:99%]) chooses, the validation split only reports; the model kwargs of the study's pretraining configs,
so that their checkpoints load (only num_classes, dropout and stochastic depth differ, none a shape).

Repeated augmentation (`:repeats=4`): each global batch of 2048 holds 512 images four times, each copy with
its own crop and flip. total_steps (so the number of model inputs, and the compute) is unchanged: the passes
through the distinct images drop from 50 to 12.5, as footnote 4 says.

The class head of the pretrained model (JFT-4B's 30k classes) is excluded (init_params_exclude='head/.*') and
freshly initialised for ImageNet's 1000; every other parameter is loaded. NFNets take any resolution as they
are: pretrained at 224, finetuned at 384 and evaluated at 480 with the same parameters.

  python -m train --config=configs/nfnet_i1k_ft.py:variant=F3+ --workdir=gs://BUCKET/study/F3+_2ep_lr0.8/finetune \
      --config.init_params=gs://BUCKET/study/F3+_2ep_lr0.8 --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`init_params` is a pretraining workdir (its latest checkpoint, the EMA copy when it kept one) or a model
imported with `python -m train.convert import`. Any variant: `:variant=F7+`; with repeated augmentation:
`:variant=F7+,repeats=4`. Shrunk to run locally on prepared data (batch 16, 20 steps, 64 images per evaluator;
it finetunes a `configs/convnets_at_scale.py:runlocal=True` run):
  python -m train --config=configs/nfnet_i1k_ft.py:variant=F0,runlocal=True --workdir=/tmp/nfnet_ft \
      --config.init_params=/tmp/nfnet_pretrain
"""
import ml_collections

from configs import common

TRAIN_EXAMPLES = 1_281_167
TRAIN_RES, EVAL_RES = 384, 480  # Smith et al. 2023


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='F3+', runlocal=False, epochs=50.0, repeats=1)
  if arg.variant.rstrip('+') not in tuple(f'F{i}' for i in range(8)):
    raise ValueError(f'variant {arg.variant!r} is unknown; use F0..F7 or F0+..F7+.')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'nfnet'
  c.model = dict(variant=arg.variant, num_classes=1000, dropout=0.25, stochastic_depth=0.1, numerics='deepmind',
                 plus_stage1_width='public', dtype='bfloat16', conv_impl='auto')
  c.task = dict(name='classification', label_smoothing=0.0)
  c.init_params = common.optional(str)  # a pretraining workdir or an imported model: given on the command line
  c.init_params_exclude = 'head/.*'

  train_split, minival = common.minival_splits('train', 1)
  c.data = dict(
      name='imagenet2012', data_dir=common.optional(str), train_split=train_split, eval_split='validation',
      pp_train=f'decode|inception_crop({TRAIN_RES})|flip_lr|value_range(-1, 1)|keep("image", "label")',
      pp_eval=f'decode|resize({EVAL_RES + 32})|central_crop({EVAL_RES})|value_range(-1, 1)|keep("image", "label")',
      augment_repeats=arg.repeats, num_train_examples=round(TRAIN_EXAMPLES * 0.99), num_threads=32, prefetch=4)
  c.evals = dict(minival=dict(split=minival), val=dict(split='validation'))
  c.batch_size = 2048
  c.eval_batch_size = 2048
  # Model inputs of `epochs` passes, whatever the repeats (footnote 4: constant compute).
  c.total_steps = int(arg.epochs * TRAIN_EXAMPLES // c.batch_size)
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000

  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=True, agc_clip=0.01, agc_eps=1e-3, agc_exclude_params=r'head/kernel',
      weight_decay=1e-5, weight_decay_params=r'.*kernel', grad_clip_norm=common.optional(float),
      ema_decay=0.9999, ema_warmup=True, sam_rho=0.05))
  c.schedule = common.schedule(base_learning_rate=0.1, warmup_steps=5000, decay='cosine')
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.runlocal:  # The pretraining configs' runlocal keeps the variant and computes in float32: so does this.
    c.model.dtype = 'float32'
    c.data.update(num_threads=2, prefetch=1)
    c.evals = dict(minival=dict(split='train[-64:]'), val=dict(split='validation[:64]'))
    c.batch_size = c.eval_batch_size = 16
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule.warmup_steps = 5
  return c
