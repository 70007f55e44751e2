r"""A CPU-sized Mistral decoder trained from scratch on real text present on every machine: the running
Python's standard-library sources (`local_text/stdlib`, ~5 MB, built offline on first use), byte-level
tokens (259 ids; the vocabulary is padded to 320 so it splits over tensor-parallel devices), rows of 256
packed tokens and a sliding window of 64 (smaller than the sequence, so the window
matters), grouped-query attention with 2 K/V heads for 4 query heads.

  python -m train --config=configs/mistral_tiny.py --workdir=workdirs/mistral_tiny

Your own corpus instead: --config.data.files='/path/to/texts/**/*.txt'.

Each row split over 4 devices (sequence parallelism: the window's keys cross shards by a halo exchange), and
rows that grow from 64 to 256 tokens (GrowLength):
  JAX_NUM_CPU_DEVICES=4 python -m train --config=configs/mistral_tiny.py --workdir=workdirs/mistral_seq4 \
      --config.mesh.data=1 --config.mesh.sequence=4 --config.data.grow_length='((0,64),(100,128),(200,256))'
"""
import ml_collections

from configs import common


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = 'mistral'
  c.init_params = common.optional(str)  # an imported model (python -m train.convert import) or a workdir
  c.model = dict(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                 sliding_window=64, vocab_size=320, norm_eps=1e-5, rope_theta=10_000.0, tie_embeddings=False,
                 dtype='float32', scan=False, remat='none', attention_impl='blockwise', block_size=64)
  c.task = dict(name='language_model')

  c.data = dict(format='packed_text', name='local_text/stdlib', files=common.optional(str),
                data_dir=common.optional(str), train_split='train', eval_split='validation',
                tokenizer='bytes', seq_len=256, num_threads=2, prefetch=2,
                grow_length=common.optional(tuple))  # GrowLength, e.g. ((0, 64), (200, 256))
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 400
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.eval_at_start = True  # the validation loss before training, to compare with the one after
  c.checkpoint_every_steps = 200

  c.optimizer = common.adamw(weight_decay=0.1, grad_clip_norm=1.0)
  c.schedule = common.schedule(base_learning_rate=3e-3, warmup_steps=40)
  c.adapter = common.adapter()
  c.microbatches = 1
  c.mesh = common.mesh(data=-1)
  c.sharding_rules = common.sharding_rules()
  c.profile_steps = common.profile_steps()  # e.g. (10, 15): a jax.profiler trace of steps 10-14
  return c
