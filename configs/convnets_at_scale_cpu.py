r"""The compute-budget study of "ConvNets Match Vision Transformers at Scale", shrunk to 2 CPU cores: the main job.

Two families on the UCI digits (8x8, 1,437 training / 360 held-out images, shipped with scikit-learn): three
NFNets of growing width and depth (the full NFNet block: scaled WS convs, signal propagation, SE, skip gains)
and three ViTs of growing width and depth (2x2 patches). Each model is trained at epoch budgets of 0.5, 1, 2,
4 and 8 (a 16x ladder; the paper's is 0.25 to 8) under the same rules as the pod study: budget.epochs sets
the steps, cosine decay after a 5% warmup, a held-out loss at the end; the NFNets with SGD + AGC (the
paper's recipe, learning rate 0.4), the ViTs with AdamW (5e-3, the best of 2e-3, 5e-3, 1e-2 and 2e-2 for
vit-S at 2 and 8 epochs). Compute is each run's analytic training FLOPs. Then the analysis: the
loss-vs-compute frontier, power-law fits per family, the compute-optimal model and epoch budget, and the
paper's question at this scale (does the ConvNet match the ViT at equal compute?).

  python -m train.sweep --config=configs/convnets_at_scale_cpu.py --workdir=workdirs/convnets_at_scale_cpu

writes one workdir per run (`nf-S_2ep`, ...) and study.md + study.png beside them, in about 10 minutes;
rerunning the command resumes where it stopped. A part of the grid:
  python -m train.sweep --config=configs/convnets_at_scale_cpu.py:models=nf-S+vit-S,epochs=1+4 --workdir=...
One run alone:
  python -m train --config=configs/convnets_at_scale_cpu.py:model=nf-S,epochs=2 --workdir=/tmp/nf-S_2ep
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
EPOCHS = (0.5, 1.0, 2.0, 4.0, 8.0)
TRAIN_EXAMPLES = 1437  # data/digits.py: every image whose index is not a multiple of 5


def get_config(arg=None):
  arg = common.parse_arg(arg, model='nf-S', epochs=1.0, lr=0.0)
  if arg.model not in NFNETS and arg.model not in VITS:
    raise ValueError(f'model {arg.model!r} is unknown; use one of {[*NFNETS, *VITS]}.')
  nfnet = arg.model in NFNETS
  c = ml_collections.ConfigDict()
  c.seed = 0
  if nfnet:
    c.model_name = 'nfnet'
    c.model = dict(num_classes=10, stem_strides=(1, 1, 1, 1), dropout=0.0, stochastic_depth=0.0,
                   numerics='deepmind', dtype='float32', conv_impl='taps', **NFNETS[arg.model])
    c.optimizer = ml_collections.ConfigDict(dict(
        name='sgd', momentum=0.9, nesterov=True, agc_clip=0.01, agc_eps=1e-3, agc_exclude_params=r'head/kernel',
        weight_decay=5e-5, weight_decay_params=r'.*kernel', grad_clip_norm=common.optional(float),
        ema_decay=common.optional(float), ema_warmup=False))
    learning_rate = arg.lr or 0.4
  else:
    c.model_name = 'vit'
    c.model = dict(num_classes=10, patch_size=2, posemb='learn', pool_type='gap', dropout=0.0, dtype='float32',
                   scan=False, remat=False, **VITS[arg.model])
    c.optimizer = common.adamw(weight_decay=1e-4, grad_clip_norm=1.0)
    learning_rate = arg.lr or 5e-3
  c.task = dict(name='classification', label_smoothing=0.0)
  c.data = dict(name='digits', data_dir=common.optional(str), train_split='train', eval_split='test',
                pp_train='value_range(-1, 1)|keep("image", "label")',
                pp_eval='value_range(-1, 1)|keep("image", "label")',
                num_train_examples=TRAIN_EXAMPLES, num_threads=1, prefetch=2)
  c.batch_size = 64
  c.eval_batch_size = 120
  c.budget = dict(epochs=arg.epochs, core_hours=common.optional(float), hardware='cpu', mfu=common.optional(float))
  c.total_steps = 0  # from the budget
  c.study = dict(family='nfnet' if nfnet else 'vit', model=arg.model, epochs=arg.epochs, learning_rate=learning_rate,
                 input_shape=(8, 8, 1))
  c.log_every_steps = 25
  c.eval_every_steps = 10**9  # the held-out loss once, at the end
  c.checkpoint_every_steps = 10**9  # at the end (and on SIGTERM): short runs, rerun from scratch if killed
  c.checkpoints_to_keep = 1
  c.schedule = ml_collections.ConfigDict(dict(base_learning_rate=learning_rate, warmup_fraction=0.05,
                                              decay='cosine', end_learning_rate=0.0))
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14
  return c


def get_sweep(arg=None):
  """Every model at every epoch budget; `:models=nf-XS+vit-XS,epochs=0.5+2` picks a part of the grid."""
  arg = common.parse_arg(arg, models='+'.join((*NFNETS, *VITS)), epochs='+'.join(map(str, EPOCHS)))
  return [f'model={m},epochs={float(e)}' for m in str(arg.models).split('+') for e in str(arg.epochs).split('+')]


def run_name(run_arg: str) -> str:
  a = common.parse_arg(run_arg, model='nf-S', epochs=1.0, lr=0.0)
  return f'{a.model}_{a.epochs:g}ep'
