"""The ImageNet finetune recipes (configs/nfnet_i1k_ft.py, configs/vit_i1k_ft.py): their numbers against the
papers, and `:runlocal=True` finetuning a `:runlocal=True` run of the study's pretraining config of the same
family, on a small prepared stand-in for ImageNet."""
import json
import re

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import convnets_at_scale, nfnet_i1k_ft, vit_at_scale, vit_i1k_ft
from train import checkpoint, loop
from train import metrics as metrics_lib


class FakeImagenet(tfds.core.GeneratorBasedBuilder):
  """ImageNet's splits, features and 1000 classes, with 96 + 64 random 48x48 images (uint8 arrays: the
  pipeline's `decode` passes decoded images through)."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {'1.0.0': 'Random images for the finetune configs\' local runs.'}

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(48, 48, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 96), 'validation': self._generate_examples(1, 64)}

  def _generate_examples(self, seed, count):
    rng = np.random.default_rng(seed)
    for i in range(count):
      yield i, {'image': rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), 'label': int(rng.integers(0, 1000))}


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('fake_imagenet'))
  FakeImagenet(data_dir=data_dir).download_and_prepare()
  return data_dir


def _on_fake_data(c, data_dir, sizes):
  """`c` reading the stand-in, its pp sizes mapped by `sizes` (e.g. 384 -> 32 pixels) so CPU steps are quick."""
  c.data.update(name='fake_imagenet', data_dir=data_dir, num_train_examples=None)
  for key in ('pp_train', 'pp_eval'):
    c.data[key] = re.sub(r'\((\d+)\)', lambda m: f'({sizes.get(int(m[1]), int(m[1]))})', c.data[key])
  return c


def test_nfnet_finetune_recipe_numbers():
  c = nfnet_i1k_ft.get_config('variant=F3+')
  assert (c.batch_size, c.schedule.base_learning_rate, c.schedule.warmup_steps, c.schedule.decay) == (
      2048, 0.1, 5000, 'cosine')  # Brock et al. 2021, A.5
  assert (c.optimizer.sam_rho, c.optimizer.weight_decay, c.model.dropout, c.model.stochastic_depth) == (
      0.05, 1e-5, 0.25, 0.1)
  assert (c.optimizer.ema_decay, c.optimizer.ema_warmup, c.optimizer.name, c.optimizer.nesterov) == (
      0.9999, True, 'sgd', True)
  assert c.total_steps == 50 * 1_281_167 // 2048  # Smith et al. 2023: 50 epochs
  assert 'inception_crop(384)' in c.data.pp_train and 'central_crop(480)' in c.data.pp_eval
  assert (c.init_params, c.init_params_exclude, c.model.num_classes) == (None, 'head/.*', 1000)
  assert (c.data.train_split, c.evals.minival.split, c.evals.val.split) == ('train[:99%]', 'train[99%:]', 'validation')
  assert c.data.augment_repeats == 1
  repeated = nfnet_i1k_ft.get_config('variant=F7+,repeats=4')
  assert repeated.data.augment_repeats == 4 and repeated.total_steps == c.total_steps  # Constant compute.
  # The study's pretraining kwargs, so that its checkpoints load: only the head may differ in shape.
  study = convnets_at_scale.get_config('model=F3+')
  assert {k: v for k, v in c.model.items() if k not in ('num_classes', 'dropout', 'stochastic_depth')} == {
      k: v for k, v in study.model.items() if k not in ('num_classes', 'dropout', 'stochastic_depth')}
  with pytest.raises(ValueError, match="variant 'F9' is unknown"):
    nfnet_i1k_ft.get_config('variant=F9')


def test_vit_finetune_recipe_numbers():
  c = vit_i1k_ft.get_config('variant=B/16')
  assert (c.batch_size, c.total_steps, c.schedule.warmup_steps, c.schedule.decay) == (512, 20_000, 500, 'cosine')
  assert (c.optimizer.name, c.optimizer.momentum, c.optimizer.nesterov, c.optimizer.weight_decay,
          c.optimizer.grad_clip_norm, c.optimizer.ema_decay) == ('sgd', 0.9, False, 0.0, 1.0, None)
  assert c.schedule.base_learning_rate == 0.03 and 0.03 in vit_i1k_ft.LEARNING_RATES
  assert 'inception_crop(384)' in c.data.pp_train and 'resize_small(448)|central_crop(384)' in c.data.pp_eval
  assert (c.init_params_exclude, c.init_params_posemb, c.model.head_zeroinit) == ('head/.*', 'bilinear', True)
  assert c.evals.minival.split == 'train[99%:]' and c.data.train_split == 'train[:99%]'
  assert [vit_i1k_ft.resolution(v) for v in ('B/16', 'L/16', 'So400m/14', 'g/14', 'G/14')] == [384, 384, 378, 518, 518]
  giant = vit_i1k_ft.get_config('variant=G/14,lr=0.01')
  assert (giant.optimizer.ema_decay, giant.schedule.decay, giant.schedule.base_learning_rate) == (
      0.9999, 'constant', 0.01)
  study = vit_at_scale.get_config('model=g/14')
  assert {k: v for k, v in giant.model.items() if k not in ('num_classes', 'variant')} == {
      k: v for k, v in study.model.items() if k not in ('num_classes', 'variant')}


def _records(workdir):
  return metrics_lib.read_metrics(str(workdir))


# (family, its pretraining config, the finetune config, pixel sizes of the two, a model small enough for CPU)
LOCAL_RUNS = {
    'nfnet': (lambda: convnets_at_scale.get_config('model=F0,runlocal=True'),
              lambda: nfnet_i1k_ft.get_config('variant=F0,runlocal=True,repeats=4'),
              {224: 32, 256: 32, 288: 40}, {384: 40, 480: 48, 512: 48},
              dict(depths=(1, 1), widths=(32, 64), group_width=32)),
    'vit': (lambda: vit_at_scale.get_config('model=So400m/14,runlocal=True'),
            lambda: vit_i1k_ft.get_config('runlocal=True'),
            {224: 28, 256: 32}, {378: 42, 441: 48},  # A 2x2 patch grid of 14 pixels, finetuned at 3x3.
            dict(width=32, mlp_dim=64, num_heads=2)),
}


def _imported(config, directory, image_size):
  """`config`'s seeded model written as `python -m train.convert import` writes one (config.json + params/)."""
  model = loop.build_model(config)
  example = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = jax.jit(lambda key: nn.unbox(model.init({'params': key, 'dropout': key}, example)['params']))(
      jax.random.key(1))
  checkpoint.save_params(str(directory), params)
  (directory / 'config.json').write_text(json.dumps({
      'model_name': config.model_name, 'model': config.model.to_dict(),
      'example_input': {'shape': list(example.shape), 'dtype': 'float32'}}))
  return jax.device_get(params)


# The NFNet starts from an imported model (saving a pretraining step's compilation), the ViT from a workdir.
@pytest.mark.parametrize('family', sorted(LOCAL_RUNS))
def test_runlocal_finetunes_a_runlocal_pretrained_model(family, imagenet_dir, tmp_path):
  pretrain_config, finetune_config, pretrain_sizes, finetune_sizes, small = LOCAL_RUNS[family]
  pre = _on_fake_data(pretrain_config(), imagenet_dir, pretrain_sizes)
  pre.model.update(num_classes=10, **small)  # As JFT's 30k classes against ImageNet's 1k.
  pre.budget, pre.total_steps, pre.checkpoint_every_steps = None, 2, 2
  pre.evals = None
  pre.eval_every_steps = 0
  # One device: eight would each run a slice of the batch on this machine's two cores, and compile longer.
  devices = jax.devices()[:1]
  if family == 'nfnet':
    source = _imported(pre, tmp_path / 'pretrain', pretrain_sizes[224])
  else:
    source = jax.device_get(loop.train(pre, str(tmp_path / 'pretrain'), devices=devices)['state']['trainable'])

  c = _on_fake_data(finetune_config(), imagenet_dir, finetune_sizes)
  c.model.update(**small)
  c.init_params = str(tmp_path / 'pretrain')
  c.total_steps, c.eval_every_steps, c.log_every_steps, c.checkpoint_every_steps = 3, 3, 1, 3
  c.schedule.warmup_steps = 1
  out = loop.train(c, str(tmp_path / 'finetune'), devices=devices)
  assert int(out['state']['step']) == 3
  records = _records(tmp_path / 'finetune')
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
  last = records[-1]
  for name in ('minival', 'val'):
    assert 0 <= last[f'eval/{name}/accuracy'] <= 1 and np.isfinite(last[f'eval/{name}/loss'])
  trainable = jax.device_get(out['state']['trainable'])
  assert source['head']['kernel'].shape[-1] == 10 and trainable['head']['kernel'].shape[-1] == 1000
  if family == 'vit':
    assert source['pos_embedding'].shape == (1, 1 + 4, 32) and trainable['pos_embedding'].shape == (1, 1 + 9, 32)
