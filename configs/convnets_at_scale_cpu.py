r"""The study of "ConvNets Match Vision Transformers at Scale", shrunk to 2 CPU cores: the main job.

The paper's protocol, in miniature: pretrain two families under epoch budgets, tune the learning rate per
(model, budget) on held-out training data, finetune the chosen runs on another task at a higher resolution,
and set the finetuned accuracy against the pretraining compute.

Pretraining: the UCI digits (8x8 grey, shipped with scikit-learn). Its training split is cut in two
(TFDS slicing, deterministic): train[:90%] (1,293 images) trains, train[90%:] (144) is the `minival` the
learning rate is chosen on, and the 360-image test split is only reported. Three NFNets of growing width and
depth (the full NFNet block: scaled WS convs, signal propagation, SE, skip gains) with SGD + Nesterov + AGC
(the paper's recipe) and three ViTs of growing width and depth (2x2 patches) with AdamW. Each (model, epoch
budget) runs a grid of 3 learning rates spaced by factors of 2 around the family's centre (NFNet 0.8, so the
grid reaches the paper's small-budget optimum of 1.6; ViT 1e-2), as the paper tunes per budget; the lowest
minival loss picks the run.

Finetuning (the transfer stage): each chosen run is finetuned on `textures` (data/textures.py: brick, grass
and gravel patches from scikit-image's photographs, another input distribution and label set) at 12x12, 1.5x
the pretraining resolution, with a new zero-initialised 3-class head (init_params_exclude='head/.*'; the ViT's
position embeddings resampled from the 4x4 to the 6x6 patch grid), for a fixed 1 epoch in batches of 32. Each
family keeps its published finetune recipe in miniature: the NFNet SGD + Nesterov with SAM (rho 0.05), dropout
and stochastic depth (Smith et al. 2023, Brock et al. 2021 A.5), the ViT SGD with momentum, no weight decay
and clipping at 1 (Dosovitskiy et al. 2020 B.1.1); each family's finetune learning rate was chosen once on the
textures minival (train[90%:]) and is fixed. The textures test split is only reported.

  python -m train.sweep --config=configs/convnets_at_scale_cpu.py --workdir=workdirs/convnets_at_scale_cpu

runs the main grid (nf-XS, nf-S, vit-XS, vit-S at 0.5, 1, 2 and 4 epochs, 3 learning rates each: 48
pretraining runs, then 16 finetunes), then writes study.md and study.png beside the runs; rerunning resumes.
The full grid (all six models, budgets up to 8 epochs: 90 runs and 30 finetunes, about three times longer):
  python -m train.sweep --config=configs/convnets_at_scale_cpu.py:grid=full --workdir=...
A part of it: `:models=nf-S+vit-S,epochs=1+4,lr_factors=1` (one learning rate). One run alone:
  python -m train --config=configs/convnets_at_scale_cpu.py:model=nf-S,epochs=2,lr=0.4 --workdir=/tmp/nf-S_2ep
  python -m train --config=configs/convnets_at_scale_cpu.py:model=nf-S,stage=finetune \
      --config.init_params=/tmp/nf-S_2ep --workdir=/tmp/nf-S_2ep/finetune
"""
import ml_collections

from configs import common

# name -> Model kwargs beyond the family's shared ones
NFNETS = {
    'nf-XS': dict(widths=(16, 32, 64, 64), depths=(1, 1, 1, 1), stem_widths=(8, 16, 16, 8)),
    'nf-S': dict(widths=(32, 64, 128, 128), depths=(1, 1, 1, 1), stem_widths=(16, 32, 32, 16)),
    'nf-M': dict(widths=(48, 96, 192, 192), depths=(1, 1, 2, 1), stem_widths=(16, 32, 32, 24)),
}
VITS = {
    'vit-XS': dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    'vit-S': dict(width=64, depth=3, mlp_dim=128, num_heads=4),
    'vit-M': dict(width=96, depth=4, mlp_dim=192, num_heads=4),
}
GRIDS = {  # grid -> (models, epoch budgets)
    'main': (('nf-XS', 'nf-S', 'vit-XS', 'vit-S'), (0.5, 1.0, 2.0, 4.0)),
    'full': ((*NFNETS, *VITS), (0.5, 1.0, 2.0, 4.0, 8.0)),
}
CENTRE_LR = {'nfnet': 0.8, 'vit': 1e-2}
LR_FACTORS = (0.5, 1.0, 2.0)
PRETRAIN_RES, FINETUNE_RES = 8, 12
MINIVAL_PERCENT = 10
FINETUNE_EPOCHS, FINETUNE_BATCH = 1, 32  # 51 steps: as accurate as 2 epochs in batches of 64, at half the FLOPs.
# Chosen once on the textures minival, finetuning the 2-epoch pretraining runs: NFNet from 0.2-1.6 (x2 steps),
# ViT from 0.05, 0.1; then fixed for every run (the pretraining learning rate is what the study tunes).
FINETUNE_LR = {'nfnet': 0.4, 'vit': 0.1}
# Which finished pretraining runs train.sweep finetunes: per (model, epochs) the learning rate chosen on minival.
FINETUNE_SELECT = 'best_lr'
# Closes study.md: what a study of this size can and cannot say about the paper's question.
STUDY_SCOPE = '''\
This is the paper's protocol run end to end at a size that fits 2 CPU cores, not a test of its claim.

What it can show: that the machinery is sound (epoch budgets turned into steps and FLOPs, the learning rate
chosen per (model, budget) on a minival carved out of training while the test split only reports, a
transfer stage with a new head at a higher resolution, fits with intervals in both of the paper's terms);
how the two families compare on this data at equal compute, within the intervals printed above; and how
differently they use the same CPU (measured core-hours and utilisation).

What it cannot show: anything about scale. The pretraining set is 1,293 digits (the paper's JFT-4B holds about
4 billion images), the models have 10^4 to 10^5 parameters (the paper's 10^8 to 10^9), the budgets are
10^-5 to 10^-3 CPU core-hours (0.4k to 110k TPU-v4 core-hours), and each point is one seed, so
differences of a point or two of accuracy are within seed noise. At this size the curves bend where data,
not compute, runs out (more epochs of 1,293 images overfit), the 3-class transfer task nears its ceiling,
and a learning rate chosen at the edge of a 3-point grid may have its optimum outside it. A CPU's
utilisation says nothing about a TPU's: the hardware-efficiency comparison must be measured on the target.
'''


def _args(arg):
  return common.parse_arg(arg, model='nf-S', epochs=1.0, lr=0.0, stage='pretrain')


def get_config(arg=None):
  arg = _args(arg)
  if arg.model not in NFNETS and arg.model not in VITS:
    raise ValueError(f'model {arg.model!r} is unknown; use one of {[*NFNETS, *VITS]}.')
  if arg.stage not in ('pretrain', 'finetune'):
    raise ValueError(f"stage {arg.stage!r} is unknown; use 'pretrain' or 'finetune'.")
  family = 'nfnet' if arg.model in NFNETS else 'vit'
  finetune = arg.stage == 'finetune'
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = family
  if family == 'nfnet':
    c.model = dict(num_classes=10, stem_strides=(1, 1, 1, 1), dropout=0.0, stochastic_depth=0.0,
                   numerics='deepmind', dtype='float32', conv_impl='taps', **NFNETS[arg.model])
    c.optimizer = ml_collections.ConfigDict(dict(
        name='sgd', momentum=0.9, nesterov=True, agc_clip=0.01, agc_eps=1e-3, agc_exclude_params=r'head/kernel',
        weight_decay=5e-5, weight_decay_params=r'.*kernel', grad_clip_norm=common.optional(float),
        ema_decay=common.optional(float), ema_warmup=False, sam_rho=common.optional(float)))
  else:
    c.model = dict(num_classes=10, patch_size=2, posemb='learn', pool_type='gap', dropout=0.0, dtype='float32',
                   scan=False, remat=False, **VITS[arg.model])
    c.optimizer = common.adamw(weight_decay=1e-4, grad_clip_norm=1.0, sam_rho=common.optional(float))
  learning_rate = arg.lr or CENTRE_LR[family]
  train_split, minival_split = common.minival_splits('train', MINIVAL_PERCENT)
  pp = 'value_range(-1, 1)|keep("image", "label")'
  c.task = dict(name='classification', label_smoothing=0.0)
  c.data = dict(name='digits', data_dir=common.optional(str), train_split=train_split, eval_split='test',
                pp_train=pp, pp_eval=pp, num_train_examples=1293, num_threads=1, prefetch=2)
  c.evals = dict(minival=dict(split=minival_split), test=dict(split='test'))
  c.batch_size = 64
  c.eval_batch_size = 120
  c.budget = dict(epochs=arg.epochs, core_hours=common.optional(float), hardware='cpu', mfu=common.optional(float))
  c.total_steps = 0  # from the budget
  c.study = dict(family=family, model=arg.model, epochs=arg.epochs, learning_rate=learning_rate,
                 input_shape=(PRETRAIN_RES, PRETRAIN_RES, 1), select_eval='minival', report_eval='test')
  c.log_every_steps = 25
  c.eval_every_steps = 10**9  # the held-out numbers once, at the end
  c.checkpoint_every_steps = 10**9  # at the end (and on SIGTERM): short runs, rerun from scratch if killed
  c.checkpoints_to_keep = 1
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=learning_rate, warmup_fraction=0.05,
                                              decay='cosine', end_learning_rate=0.0))
  c.init_params = common.optional(str)
  c.init_params_exclude = common.optional(str)
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14
  if finetune:
    _finetune(c, family)
  return c


def _finetune(c, family):
  """The transfer stage: textures at twice the resolution, a new head, each family's finetune recipe."""
  train_split, minival_split = common.minival_splits('train', MINIVAL_PERCENT)
  c.model.num_classes = 3
  c.init_params_exclude = 'head/.*'  # A new, zero-initialised head; everything else from the pretraining run.
  c.data = dict(name='textures', data_dir=common.optional(str), train_split=train_split, eval_split='test',
                pp_train=f'resize({FINETUNE_RES}, antialias=True)|flip_lr|value_range(-1, 1)|keep("image", "label")',
                pp_eval=f'resize({FINETUNE_RES}, antialias=True)|value_range(-1, 1)|keep("image", "label")',
                num_train_examples=1620, num_threads=1, prefetch=2)
  c.evals = dict(minival=dict(split=minival_split), test=dict(split='test'))
  c.batch_size = FINETUNE_BATCH
  c.budget = dict(epochs=float(FINETUNE_EPOCHS), core_hours=common.optional(float), hardware='cpu',
                  mfu=common.optional(float))
  c.study.update(input_shape=(FINETUNE_RES, FINETUNE_RES, 1), epochs=float(FINETUNE_EPOCHS),
                 learning_rate=FINETUNE_LR[family], stage='finetune')
  c.schedule.update(base_learning_rate=FINETUNE_LR[family], warmup_fraction=0.1)
  if family == 'nfnet':
    c.model.update(dropout=0.25, stochastic_depth=0.1)
    c.optimizer.update(sam_rho=0.05, weight_decay=1e-5)
  else:
    c.optimizer = ml_collections.ConfigDict(dict(
        name='sgd', momentum=0.9, nesterov=False, weight_decay=0.0, weight_decay_params=r'.*kernel',
        grad_clip_norm=1.0, ema_decay=common.optional(float), ema_warmup=False, sam_rho=common.optional(float)))


def get_sweep(arg=None):
  """The runs of `grid` ('main' or 'full'); `models=nf-XS+vit-XS,epochs=0.5+2,lr_factors=0.5+1` picks a part."""
  arg = common.parse_arg(arg, grid='main', models='', epochs='', lr_factors='+'.join(map(str, LR_FACTORS)))
  if arg.grid not in GRIDS:
    raise ValueError(f'grid {arg.grid!r} is unknown; use one of {sorted(GRIDS)}.')
  models, epochs = GRIDS[arg.grid]
  models = str(arg.models).split('+') if arg.models else models
  epochs = [float(e) for e in str(arg.epochs).split('+')] if arg.epochs else epochs
  factors = [float(f) for f in str(arg.lr_factors).split('+')]
  runs = []
  for m in models:
    centre = CENTRE_LR['nfnet' if m in NFNETS else 'vit']
    runs += [f'model={m},epochs={float(e)},lr={centre * f:g}' for e in epochs for f in factors]
  return runs


def run_name(run_arg: str) -> str:
  a = _args(run_arg)
  return f'{a.model}_{a.epochs:g}ep_lr{a.lr:g}'


def finetune_config(run_arg: str) -> str:
  """The finetune stage of pretraining run `run_arg` (train.sweep sets its init_params to that run)."""
  return f'{__file__}:model={_args(run_arg).model},stage=finetune'
