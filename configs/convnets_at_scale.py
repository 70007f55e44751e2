r"""The study of "ConvNets Match Vision Transformers at Scale" (Smith et al. 2023) at pod scale.

One run is one (model, epoch budget, learning rate); the grid is NFNet F0, F1, F3, F3+, F7, F7+ x epoch
budgets 0.25, 0.5, 1, 2, 4, 8 x learning rates spaced by factors of 2 around 1.6. The 2021 JFT recipe
(Brock et al. 2021, appendix; the study keeps it): batch 4096, SGD with Nesterov momentum 0.9, adaptive
gradient clipping 0.01 sparing the classifier, weight decay 1e-6 on weights, cosine decay after a short
warmup, random-resized crops and flips only, no EMA, no dropout; train at 224, evaluate at 256.

The learning rate is chosen per (model, epochs) on `minival` (the study block's select_eval): with the
ImageNet stand-in, the last 1% of its training split (train[99%:], big_vision's ImageNet minival; the runs
train on train[:99%]), while the validation split (`test`) is only reported. With JFT-4B, the held-out split
both chooses and is reported, as in the paper (its headline is the finetuned ImageNet top-1 anyway).

Then the finetune stage (finetune_config): the chosen run of each (model, epochs) (FINETUNE_SELECT='best_lr')
is finetuned on ImageNet with configs/nfnet_i1k_ft.py (its variant; init_params: the pretraining run, whose
class head, JFT's 30k classes, is excluded and freshly initialised).

One run:
  python -m train --config=configs/convnets_at_scale.py:model=F3+,epochs=2,lr=0.8 \
      --workdir=gs://BUCKET/study/F3+_2ep_lr0.8 --config.data.data_dir=gs://BUCKET/tensorflow_datasets
and its finetune alone:
  python -m train --config=configs/nfnet_i1k_ft.py:variant=F3+ --config.init_params=gs://BUCKET/study/F3+_2ep_lr0.8 \
      --workdir=gs://BUCKET/study/F3+_2ep_lr0.8/finetune
The whole grid, both stages (a dry run prints every pretraining run's steps and estimated TPU-v4 core-hours,
then one finetune row per (model, epochs), and the total; no data or accelerator needed):
  python -m train.sweep --config=configs/convnets_at_scale.py --workdir=gs://BUCKET/study --dry_run
  python -m train.sweep --config=configs/convnets_at_scale.py --workdir=gs://BUCKET/study \
      --set=data.data_dir=gs://BUCKET/tensorflow_datasets          # --stage=pretrain or --stage=finetune: one
then the analysis (pretraining loss and finetuned top-1 against compute, fits, utilisation, plot):
  python -m train.analyze --workdirs='gs://BUCKET/study/F*' --out=study --compute=budget_core_hours

The data is a config argument. JFT-4B (the paper's, ~4B images, ~30k classes) is private: `dataset=jft4b`
reads a tfds builder of that name that you provide. The default stand-in is public ImageNet-1k,
`imagenet2012` (prepare once: tfds build imagenet2012 --file_format=array_record --manual_dir=...);
epoch budgets then count its 1.28M images. Budgets are epochs; the loop turns them into steps, and the
sweep's core-hour estimates assume `mfu` (0.35 reproduces the paper's 110k core-hours for F7+ x 8 epochs
of JFT-4B). The ViT comparison points are configs/vit_at_scale.py.
"""
import os

import ml_collections

from configs import common

MODELS = ('F0', 'F1', 'F3', 'F3+', 'F7', 'F7+')
EPOCHS = common.STUDY_EPOCHS
LEARNING_RATES = (0.4, 0.8, 1.6, 3.2)  # factors of 2 around the paper's small-budget optimum of 1.6
TRAIN_RES, EVAL_RES = 224, 256
# Which finished pretraining runs train.sweep finetunes: per (model, epochs) the learning rate chosen on minival.
FINETUNE_SELECT = 'best_lr'


def get_config(arg=None):
  arg = common.parse_arg(arg, model='F0', epochs=1.0, lr=1.6, dataset='imagenet2012', mfu=0.35, runlocal=False)
  if arg.model not in MODELS:
    raise ValueError(f'model {arg.model!r} is not in the study; use one of {MODELS}.')
  num_classes = common.STUDY_DATASETS.get(arg.dataset, (0, 0, ''))[1]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'nfnet'
  c.model = dict(variant=arg.model, num_classes=num_classes, dropout=0.0, stochastic_depth=0.0,
                 numerics='deepmind', plus_stage1_width='public', dtype='bfloat16', conv_impl='auto')
  c.task = dict(name='classification', label_smoothing=0.0)
  c.data = common.study_image_data(arg.dataset, TRAIN_RES, EVAL_RES)
  c.evals, select_eval = common.study_held_out(c.data, arg.dataset)
  c.batch_size = 4096
  c.eval_batch_size = 4096
  c.budget = dict(epochs=arg.epochs, core_hours=common.optional(float), hardware='tpu_v4', mfu=arg.mfu)
  c.total_steps = 0  # from the budget
  c.study = dict(family='nfnet', model=arg.model, epochs=arg.epochs, learning_rate=arg.lr,
                 input_shape=(TRAIN_RES, TRAIN_RES, 3), select_eval=select_eval, report_eval='test')
  c.log_every_steps = 100
  c.eval_every_steps = 10**9  # the held-out loss once, at the end (the loop always evaluates the last step)
  c.checkpoint_every_steps = 1000

  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=True, agc_clip=0.01, agc_eps=1e-3, agc_exclude_params=r'head/kernel',
      weight_decay=1e-6, weight_decay_params=r'.*kernel', grad_clip_norm=common.optional(float),
      ema_decay=common.optional(float), ema_warmup=False))
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=arg.lr, warmup_fraction=0.02, decay='cosine',
                                              end_learning_rate=0.0))
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.runlocal:
    c.model.update(dtype='float32')
    c.data.update(eval_split=f'{c.data.eval_split}[:64]', num_threads=2, prefetch=1)
    c.evals = {name: dict(split=split) for name, split in (('minival', 'train[:64]'), ('test', c.data.eval_split))
               if name in c.evals}  # A smoke run: its minival overlaps training.
    c.batch_size = c.eval_batch_size = 16
    c.budget.epochs = 16 * 20 / c.data.num_train_examples  # 20 steps
    c.log_every_steps, c.checkpoint_every_steps = 5, 10
  return c


def get_sweep(arg=None):
  """The paper's grid: one config argument string per run (model x epoch budget x learning rate)."""
  base = common.parse_arg(arg, dataset='imagenet2012', mfu=0.35)
  return common.study_grid(MODELS, EPOCHS, LEARNING_RATES, dataset=base.dataset, mfu=base.mfu)


def finetune_config(run_arg: str) -> str:
  """The ImageNet finetune of pretraining run `run_arg` (train.sweep sets its init_params to that run)."""
  a = common.parse_arg(run_arg, model='F0', epochs=1.0, lr=1.6, dataset='imagenet2012', mfu=0.35, runlocal=False)
  return f'{os.path.join(os.path.dirname(__file__), "nfnet_i1k_ft.py")}:variant={a.model}'


def run_name(run_arg: str) -> str:
  """'model=F3+,epochs=2.0,lr=0.8,...' -> 'F3+_2ep_lr0.8' (the run's workdir under the sweep's)."""
  a = common.parse_arg(run_arg, model='F0', epochs=1.0, lr=1.6, dataset='imagenet2012', mfu=0.35, runlocal=False)
  return f'{a.model}_{a.epochs:g}ep_lr{a.lr:g}'
