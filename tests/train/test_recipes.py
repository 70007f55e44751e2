"""The paper recipes run through the shared loop: the pod configs with only data and sizes shrunk."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import nfnet_i1k
from train import loop, optimizers
from train import metrics as metrics_lib


def test_nfnet_f0_recipe_takes_a_sharded_step(digits_dir, tmp_path):
  c = nfnet_i1k.get_config('variant=F0')
  # The F0 architecture, optimizer (SGD + AGC + coupled decay), EMA, label smoothing and mixing of the
  # pod config, on 8x8 digits upsampled to 32x32 instead of ImageNet.
  c.model.num_classes = 10
  c.model.dtype = 'float32'
  c.model.conv_impl = 'native'  # 'auto' picks taps on CPU: equal within the tests of models/nfnet, slower to compile
  c.data.update(name='digits', data_dir=digits_dir, train_split='train', eval_split='test[:16]',
                pp_train='resize(32)|onehot(10)|keep("image", "labels")',
                pp_eval='resize(32)|value_range(-1, 1)|keep("image", "label")', num_threads=1, prefetch=1)
  c.data.mix.pp_after = 'randaugment(4, 5)|value_range(-1, 1)'  # Grayscale: no RGB standardisation.
  c.batch_size = c.eval_batch_size = 8
  # No evaluation: its compilation would double the cost, and the loop tests cover it.
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1, 0, 1
  c.schedule.warmup_steps = 0
  # 2 data-parallel devices: 8 would run eight one-image slices of F0 on this machine's 2 cores (20 s more).
  out = loop.train(c, str(tmp_path), devices=jax.devices()[:2])
  assert int(out['state']['step']) == 1
  (record,) = metrics_lib.read_metrics(str(tmp_path))
  assert np.isfinite(record['train/loss']) and np.isfinite(record['train/grad_norm'])
  assert set(out['state']) == {'step', 'trainable', 'opt_state', 'ema'}
  head = out['state']['trainable']['head']['kernel']
  assert head.shape == (3072, 10) and len(head.sharding.device_set) == 2


def test_nfnet_recipe_masks_select_by_parameter_name():
  c = nfnet_i1k.get_config('variant=F0')
  model = loop.build_model(c)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']))
  names = jax.tree.leaves(optimizers.param_names(params))
  decayed = dict(zip(names, jax.tree.leaves(optimizers.regex_mask(params, c.optimizer.weight_decay_params))))
  agc_excluded = dict(zip(names, jax.tree.leaves(optimizers.regex_mask(params, c.optimizer.agc_exclude_params))))
  assert len(names) > 200
  for name in names:
    is_weight = name.endswith('kernel')
    assert decayed[name] == is_weight, name  # No decay on gains, biases or skip gains.
    assert agc_excluded[name] == (name == 'head/kernel'), name
  assert any(n.endswith('skip_gain') for n in names) and any(n.endswith('/gain') for n in names)


def test_mistral_tiny_trains_on_8_devices_with_fsdp_and_tensor_parallelism(tmp_path, tiny_mistral_config):
  c = tiny_mistral_config
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 1, 3, 3
  c.schedule.warmup_steps = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  out = loop.train(c, str(tmp_path / 'workdir'))
  records = metrics_lib.read_metrics(str(tmp_path / 'workdir'))
  assert [r['step'] for r in records] == [0, 1, 2, 3]  # eval_at_start: step 0 is the untrained model's eval
  assert all(np.isfinite(r['train/loss']) for r in records[1:]) and records[-1]['eval/tokens'] > 0
  query = out['state']['trainable']['layer_0']['attn']['query']['kernel']  # (embed, heads, head_dim)
  assert tuple(query.sharding.spec)[:2] == ('fsdp', 'tensor')
  assert query.addressable_shards[0].data.shape == (16, 2, 8)
  # The sampling command reloads exactly these parameters from the workdir and continues a prompt.
  from models import mistral
  from train import sample
  config, model, params, step = sample.load(str(tmp_path / 'workdir'))
  assert step == 3 and config.model.sliding_window == 8
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(out['state']['trainable']))
  tokens = mistral.generate(model, params, np.array([[1, 40, 41]], np.int32), 10)
  assert tokens.shape == (1, 13) and (np.asarray(tokens) < c.model.vocab_size).all()
