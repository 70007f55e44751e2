r"""ViT comparison points of "ConvNets Match Vision Transformers at Scale": ViT-g/14, ViT-G/14, SoViT-400m/14.

The paper compares its NFNets with these ViTs' published results (ImageNet top-1 after JFT pre-training at
about 120k, 280k and 130k TPU-v4 core-hours). Trained here under the same budget rules and data as
configs/convnets_at_scale.py, so one sweep and one analysis hold both families: batch 4096, AdamW
(b2 0.95) with weight decay 0.1 on weights, learning rate 8e-4 with warmup and cosine decay, no dropout, 224
pixels for training and evaluation (learned position embeddings fix the grid), class-token pooling, bf16, scanned and
rematerialised blocks, FSDP over all devices.

The learning rate is chosen per (model, epochs) on `minival` and the `test` split only reported, as in
configs/convnets_at_scale.py (common.study_held_out). Then the finetune stage: the chosen run of each (model,
epochs) (FINETUNE_SELECT='best_lr') is finetuned on ImageNet with configs/vit_i1k_ft.py (its variant;
init_params: the pretraining run, its class head excluded and freshly initialised, the position embeddings
resampled to the finetune resolution's patch grid).

  python -m train --config=configs/vit_at_scale.py:model=So400m/14,epochs=1 \
      --workdir=gs://BUCKET/study/So400m-14_1ep_lr0.0008
  python -m train --config=configs/vit_i1k_ft.py:variant=So400m/14 \
      --config.init_params=gs://BUCKET/study/So400m-14_1ep_lr0.0008 \
      --workdir=gs://BUCKET/study/So400m-14_1ep_lr0.0008/finetune
Both stages of the whole grid (a dry run lists them with steps and estimated core-hours; --stage=pretrain or
--stage=finetune runs one), then the analysis of both families together:
  python -m train.sweep --config=configs/vit_at_scale.py --workdir=gs://BUCKET/study --dry_run
  python -m train.sweep --config=configs/vit_at_scale.py --workdir=gs://BUCKET/study
  python -m train.analyze --workdirs='gs://BUCKET/study/F*' --workdirs='gs://BUCKET/study/*-14_*' --out=study
"""
import os

import ml_collections

from configs import common

MODELS = ('So400m/14', 'g/14', 'G/14')
EPOCHS = common.STUDY_EPOCHS
LEARNING_RATES = (4e-4, 8e-4)
TRAIN_RES, EVAL_RES = 224, 224  # learned position embeddings fix the grid
# Which finished pretraining runs train.sweep finetunes: per (model, epochs) the learning rate chosen on minival.
FINETUNE_SELECT = 'best_lr'


def get_config(arg=None):
  arg = common.parse_arg(arg, model='So400m/14', epochs=1.0, lr=8e-4, dataset='imagenet2012', mfu=0.35,
                         runlocal=False)
  if arg.model not in MODELS:
    raise ValueError(f'model {arg.model!r} is not a comparison point; use one of {MODELS}.')
  num_classes = common.STUDY_DATASETS.get(arg.dataset, (0, 0, ''))[1]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = dict(variant=arg.model, num_classes=num_classes, posemb='learn', pool_type='tok', dropout=0.0,
                 head_zeroinit=True, dtype='bfloat16', scan=True, remat=True)
  c.task = dict(name='classification', label_smoothing=0.0)
  c.data = common.study_image_data(arg.dataset, TRAIN_RES, EVAL_RES)
  c.evals, select_eval = common.study_held_out(c.data, arg.dataset)
  c.batch_size = 4096
  c.eval_batch_size = 4096
  c.budget = dict(epochs=arg.epochs, core_hours=common.optional(float), hardware='tpu_v4', mfu=arg.mfu)
  c.total_steps = 0  # from the budget
  c.study = dict(family='vit', model=arg.model, epochs=arg.epochs, learning_rate=arg.lr,
                 input_shape=(TRAIN_RES, TRAIN_RES, 3), select_eval=select_eval, report_eval='test')
  c.log_every_steps = 100
  c.eval_every_steps = 10**9  # the held-out loss once, at the end
  c.checkpoint_every_steps = 1000

  c.optimizer = common.adamw(weight_decay=0.1, grad_clip_norm=1.0, b2=0.95)
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=arg.lr, warmup_fraction=0.02, decay='cosine',
                                              end_learning_rate=0.0))
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.runlocal:
    c.model.update(depth=2, dtype='float32', scan=False, remat=False)
    c.data.update(eval_split=f'{c.data.eval_split}[:64]', num_threads=2, prefetch=1)
    c.evals = {name: dict(split=split) for name, split in (('minival', 'train[:64]'), ('test', c.data.eval_split))
               if name in c.evals}  # A smoke run: its minival overlaps training.
    c.batch_size = c.eval_batch_size = 16
    c.budget.epochs = 16 * 20 / c.data.num_train_examples
    c.log_every_steps, c.checkpoint_every_steps = 5, 10
    c.mesh = common.mesh(data=-1)
  return c


def get_sweep(arg=None):
  base = common.parse_arg(arg, dataset='imagenet2012', mfu=0.35)
  return common.study_grid(MODELS, EPOCHS, LEARNING_RATES, dataset=base.dataset, mfu=base.mfu)


def finetune_config(run_arg: str) -> str:
  """The ImageNet finetune of pretraining run `run_arg` (train.sweep sets its init_params to that run)."""
  a = common.parse_arg(run_arg, model='So400m/14', epochs=1.0, lr=8e-4, dataset='imagenet2012', mfu=0.35,
                       runlocal=False)
  return f'{os.path.join(os.path.dirname(__file__), "vit_i1k_ft.py")}:variant={a.model}'


def run_name(run_arg: str) -> str:
  a = common.parse_arg(run_arg, model='So400m/14', epochs=1.0, lr=8e-4, dataset='imagenet2012', mfu=0.35,
                       runlocal=False)
  return f'{a.model.replace("/", "-")}_{a.epochs:g}ep_lr{a.lr:g}'
