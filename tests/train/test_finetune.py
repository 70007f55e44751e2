"""Starting a vision run from pretrained weights: init_params with init_params_exclude (a new head), the ViT
position embedding resampled to a new patch grid, the one-line refusals, and a pretrain -> finetune of the
digits ViT through `python -m train` that resumes bitwise after kill -9."""
import json
import os
import shutil
import sys
import textwrap

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.ndimage

from data import pipeline
from train import checkpoint, cli, loop
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The pretraining run: the tiny digits ViT (8x8 images in 4x4 patches: a 2x2 grid, no class token, 10 classes).
PRETRAIN = {'total_steps': 2, 'checkpoint_every_steps': 2, 'schedule.warmup_steps': 0}
# Finetuning it at 16x16 (a 4x4 grid) on 3 classes; learning rate 0, so the state after one step is the start.
AT_16 = {'data.pp_train': 'resize(16)|value_range(-1, 1)|keep("image", "label")',
         'data.pp_eval': 'resize(16)|value_range(-1, 1)|keep("image", "label")', 'data.eval_split': 'test[:16]'}
START = {'total_steps': 1, 'checkpoint_every_steps': 1, 'schedule.base_learning_rate': 0.0,
         'schedule.warmup_steps': 0, 'model.num_classes': 3}


def _flat(tree):
  return {k: np.asarray(v) for k, v in _leaves(tree).items()}


def _leaves(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(str(k.key) for k in path): leaf for path, leaf in leaves}


@pytest.fixture(scope='module')
def pretrained(digits_dir, tmp_path_factory, tiny_config):
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  out = loop.train(tiny_config(digits_dir, **PRETRAIN), workdir)
  return workdir, _flat(jax.device_get(out['state']['trainable']))


def _finetune(tiny_config, digits_dir, workdir, devices=None, **overrides):
  config = tiny_config(digits_dir, **{**START, **AT_16, **{k: v for k, v in overrides.items() if '.' in k}})
  for key, value in overrides.items():  # Fields a config may lack (vit_digits has no init_params).
    if '.' not in key:
      config[key] = value
  return loop.train(config, str(workdir), devices=devices)


def test_head_excluded_is_fresh_the_rest_loaded_and_posemb_resampled(pretrained, digits_dir, tmp_path, tiny_config):
  source_dir, source = pretrained
  random_head = {'model.head_zeroinit': False}  # A seeded head that is not all zeros, to tell inits apart.
  out = _finetune(tiny_config, digits_dir, tmp_path / 'ft', init_params=source_dir, init_params_exclude='head/.*',
                  **random_head, **{'mesh.data': 2, 'mesh.fsdp': 4})  # Restored straight into an FSDP layout.
  started = _leaves(out['state']['trainable'])
  got = {k: np.asarray(v) for k, v in started.items()}
  seeded = _flat(jax.device_get(_finetune(tiny_config, digits_dir, tmp_path / 'seeded', **random_head,
                                          **{'mesh.data': 1}, devices=jax.devices()[:1])['state']['trainable']))

  assert source['head/kernel'].shape == (16, 10) and got['head/kernel'].shape == (16, 3)
  assert np.abs(got['head/kernel']).min() > 0
  for name in ('head/kernel', 'head/bias'):  # This run's own seeded init, not the source's head.
    np.testing.assert_array_equal(got[name], seeded[name])
  assert not np.array_equal(got['encoder/block_0/mlp/fc1/kernel'], seeded['encoder/block_0/mlp/fc1/kernel'])
  for name, value in source.items():
    if name.startswith('head/') or name == 'pos_embedding':
      continue
    np.testing.assert_array_equal(got[name], value, err_msg=name)  # Loaded bit for bit.
  # The 2x2 grid of position embeddings at 8x8 pixels, resampled to the 4x4 grid of 16x16 pixels the
  # big_vision way (scipy's order-1 zoom, config.init_params_posemb's default).
  want = scipy.ndimage.zoom(source['pos_embedding'].reshape(2, 2, 16), (2, 2, 1), order=1).reshape(1, 16, 16)
  np.testing.assert_allclose(got['pos_embedding'], want, atol=1e-6, rtol=0)
  kernel = started['encoder/block_0/mlp/fc1/kernel']
  assert kernel.sharding.spec[0] == 'fsdp' and kernel.addressable_shards[0].data.shape[0] == 4


def test_from_an_imported_model_with_timm_resampling(pretrained, digits_dir, tmp_path, tiny_config):
  """The same start from a `python -m train.convert import`-style directory (config.json + params/), partially
  restored, with the position embedding resampled the timm way ('bicubic': its resample_abs_pos_embed)."""
  import torch
  from timm.layers import pos_embed
  source_dir, source = pretrained
  imported = tmp_path / 'imported'
  checkpoint.save_params(str(imported), traverse_util.unflatten_dict(source, sep='/'))
  with open(os.path.join(source_dir, 'config.json')) as f:
    recorded = json.load(f)
  (imported / 'config.json').write_text(json.dumps({'model_name': 'vit', 'model': recorded['model']}))
  out = _finetune(tiny_config, digits_dir, tmp_path / 'ft', init_params=str(imported), init_params_exclude='head/.*',
                  init_params_posemb='bicubic')
  got = _flat(jax.device_get(out['state']['trainable']))
  want = pos_embed.resample_abs_pos_embed(torch.tensor(source['pos_embedding']), [4, 4], num_prefix_tokens=0)
  np.testing.assert_allclose(got['pos_embedding'], want.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got['encoder/ln_final/scale'], source['encoder/ln_final/scale'])
  assert got['head/kernel'].shape == (16, 3) and not got['head/kernel'].any()  # The zero init of ViT's head.


def test_frozen_base_comes_from_the_start_with_the_head_excluded(pretrained, digits_dir, tmp_path, tiny_config):
  """With the freeze adapter, the frozen encoder is the loaded one, rebuilt the same way at resume and by the
  tools' run loader (train/runs.py restore_params), the trained head and the excluded parameters' own init
  beside it."""
  from train.tools import loader
  source_dir, source = pretrained
  fields = dict(init_params=source_dir, init_params_exclude='head/.*|pos_embedding', **{
      'adapter.name': 'freeze', 'adapter.params': 'encoder/.*', 'total_steps': 2, 'checkpoint_every_steps': 1,
      'schedule.base_learning_rate': 0.01, 'schedule.warmup_steps': 0})
  straight = _finetune(tiny_config, digits_dir, tmp_path / 'straight', **fields)
  base = _flat(jax.device_get(straight['frozen']['base']))
  assert base and all(n.startswith('encoder/') for n in base)
  for name, value in base.items():
    np.testing.assert_array_equal(value, source[name], err_msg=name)
  # As if it had died after its step-1 checkpoint: the resumed run rebuilds the frozen base from init_params.
  shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '2')
  resumed = _finetune(tiny_config, digits_dir, tmp_path / 'resumed', **fields)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed['state']), jax.device_get(straight['state']))
  run = loader.load_run(str(tmp_path / 'straight'))
  merged = {**base, **_flat(jax.device_get(straight['state']['trainable']))}
  jax.tree.map(np.testing.assert_array_equal, _flat(jax.device_get(run.params)), merged)
  # That run as init_params in turn: its frozen base is rebuilt (not in its checkpoint), its head still excluded.
  again = _finetune(tiny_config, digits_dir, tmp_path / 'again', init_params=str(tmp_path / 'straight'),
                    init_params_exclude='head/.*')
  got = _flat(jax.device_get(again['state']['trainable']))
  assert {n for n in merged if not n.startswith('head/')} == {n for n in got if not n.startswith('head/')}
  for name, value in merged.items():
    if not name.startswith('head/'):
      np.testing.assert_array_equal(got[name], value, err_msg=name)


def _refusal(run) -> str:
  with pytest.raises(Exception) as error:
    run()
  assert cli.exit_status(error.value) == cli.BAD_INPUT_EXIT, error.value
  line = cli.summary(error.value)
  assert '\n' not in line
  return line


def test_bad_starts_are_one_line_each(pretrained, digits_dir, tmp_path, tiny_config):
  source_dir, _ = pretrained
  finetune = lambda name, **overrides: lambda: _finetune(tiny_config, digits_dir, tmp_path / name, **overrides)
  line = _refusal(finetune('nothing', init_params=source_dir, init_params_exclude='classifier/.*'))
  assert "init_params_exclude='classifier/.*' matches no parameter" in line and "'encoder/block_0/" in line
  line = _refusal(finetune('alone', init_params_exclude='head/.*'))
  assert line.startswith('init_params_exclude is set but init_params is not: set --config.init_params=DIR')
  line = _refusal(finetune('new_head', init_params=source_dir))  # 10 classes there, 3 here, nothing excluded.
  assert "'head/bias' has shape (10,) there but (3,) in this model" in line and 'init_params_exclude' in line
  line = _refusal(finetune('wider', init_params=source_dir, init_params_exclude='head/.*', **{'model.width': 32}))
  assert 'has shape' in line and '32' in line and 'init_params_exclude' in line
  line = _refusal(finetune('method', init_params=source_dir, init_params_exclude='head/.*',
                           init_params_posemb='nearest'))
  assert "'nearest' is unknown" in line and "init_params_posemb='nearest'" in line

  other = tmp_path / 'nfnet_source'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps({'model_name': 'nfnet', 'model': {}}))
  line = _refusal(finetune('kind', init_params=str(other), init_params_exclude='head/.*'))
  assert "holds model_name='nfnet', this run 'vit'; point init_params at a model of the same kind" in line
  # A resolution the ViT cannot take: 10x10 pixels in 4x4 patches.
  line = _refusal(lambda: loop.train(tiny_config(digits_dir, **{'data.pp_eval': 'resize(10)|value_range(-1, 1)'}),
                                     str(tmp_path / 'ten')))
  assert 'image size (10, 10) is not divisible by the ViT patch size (4, 4)' in line and 'patch_size' in line


FINETUNE_CONFIG = '''
"""The tiny digits ViT finetuned on textures at 16x16, 3 classes: written by tests/train/test_finetune.py."""
from configs import common, vit_digits


def get_config(arg=None):
  c = vit_digits.get_config(arg)
  c.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, num_classes=3)
  pp = 'resize(16)|value_range(-1, 1)|keep("image", "label")'
  c.data.update(name='textures', train_split='train', eval_split='test[:64]', pp_train=pp, pp_eval=pp)
  c.batch_size = c.eval_batch_size = 16
  c.init_params = common.optional(str)
  c.init_params_exclude = 'head/.*'
  c.init_params_posemb = 'bicubic'
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 40, 5, 20, 10
  c.schedule.warmup_steps = 5
  return c
'''
TINY = ('--config.model.width=16', '--config.model.depth=2', '--config.model.mlp_dim=32',
        '--config.model.num_heads=2', '--config.model.patch_size=4', '--config.batch_size=16',
        '--config.eval_batch_size=16', '--config.eval_every_steps=0', '--config.schedule.warmup_steps=1')


def _final(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']['trainable']


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k.startswith(('train/', 'eval/', 'step'))}
          for r in metrics_lib.read_metrics(str(workdir))]


def test_pretrain_then_finetune_elsewhere_resumes_bitwise_after_kill_9(digits_dir, tmp_path, kill_9_and_resume):
  """Digits at 8x8 (10 classes) -> textures at 16x16 (3 classes) through the command line, head excluded and
  position embedding resampled; a finetune killed with kill -9 and rerun ends bit for bit like one that was not."""
  pretrain = tmp_path / 'pretrain'
  # Pretrained in this process (only the finetune's kill and resume need processes of their own).
  loop.train(cli.load_config(os.path.join(REPO, 'configs/vit_digits.py'), [f'--config.data.data_dir={digits_dir}', *TINY,
                                                       '--config.total_steps=20', '--config.checkpoint_every_steps=20']),
             str(pretrain), devices=jax.devices()[:1])
  pipeline.get_source('textures', 'train', digits_dir)  # Prepared once here: two runs at once would race to it.
  config_file = tmp_path / 'textures_ft.py'
  config_file.write_text(textwrap.dedent(FINETUNE_CONFIG))
  command = lambda workdir: [sys.executable, '-m', 'train', f'--config={config_file}', f'--workdir={workdir}',
                             f'--config.data.data_dir={digits_dir}', f'--config.init_params={pretrain}']
  straight, killed, _ = kill_9_and_resume(command, tmp_path, kill_at=10, last_step=40)
  assert _metrics(killed) == _metrics(straight)
  a, b = _final(str(killed), 40), _final(str(straight), 40)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert a['head']['kernel'].shape == (16, 3) and a['pos_embedding'].shape == (1, 16, 16)
  assert _metrics(straight)[-1]['eval/accuracy'] > 0.4  # Learning the textures, not guessing (1/3).
