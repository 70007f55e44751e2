r"""ViT-B/16 trained from scratch on ImageNet-1k at pod scale.

Recipe: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Appendix B.1 / Table 3 (ImageNet rows):
Adam(W) b1=0.9 b2=0.999, batch 4096, base learning rate 3e-3 with 10k linear warmup steps then cosine
decay, weight decay 0.3 (optax's decoupled form, scaled by the learning rate), global-norm gradient
clipping at 1, dropout 0.1, 300 epochs at 224x224, inception-style crops and flips. Class token
pooling, learned position embeddings, zero-initialised head.

The dataset must be prepared once in ArrayRecord format (it cannot be downloaded automatically):
  tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record --manual_dir=...

On a v4-32 (16 hosts' chips as one mesh; FSDP over all of them):
  python -m train --config=configs/vit_i1k.py --workdir=gs://BUCKET/vit_b16_i1k \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Shrunk to run locally (a 2-block model, batch 16, 20 steps, 64 validation images; still needs the data):
  python -m train --config=configs/vit_i1k.py:runlocal=True --workdir=/tmp/vit_i1k_local
Any variant: --config=configs/vit_i1k.py:variant=L/16
"""
import ml_collections

from configs import common

TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='B/16', runlocal=False, epochs=300)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'vit'
  c.model = dict(num_classes=1000, variant=arg.variant, posemb='learn', pool_type='tok', dropout=0.1,
                 head_zeroinit=True, dtype='bfloat16', scan=True, remat=True)
  c.task = dict(name='classification', label_smoothing=0.0)

  c.data = dict(name='imagenet2012', data_dir=common.optional(str), train_split='train', eval_split='validation',
                pp_train='decode|resize_small(256)|random_crop(224)|flip_lr|value_range(-1, 1)|keep("image", "label")',
                pp_eval='decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|keep("image", "label")',
                num_threads=16, prefetch=4)
  c.batch_size = 4096
  c.eval_batch_size = 4096
  c.total_steps = arg.epochs * TRAIN_EXAMPLES // c.batch_size
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000

  c.optimizer = common.adamw(weight_decay=0.3, grad_clip_norm=1.0)
  c.schedule = common.schedule(base_learning_rate=3e-3, warmup_steps=10_000, decay='cosine')
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14

  if arg.runlocal:
    c.model.update(depth=2, dtype='float32', scan=False, remat=False)
    c.data.update(eval_split='validation[:64]', num_threads=2, prefetch=1)
    c.batch_size = c.eval_batch_size = 16
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 5, 20, 10
    c.schedule.warmup_steps = 5
    c.mesh = common.mesh(data=-1)
  return c
