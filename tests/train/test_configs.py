"""Every config loads, documents its command, names every required field and builds its model."""
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from configs import common
from train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not os.path.basename(p).startswith(('_', 'common')))


def test_there_are_configs():
  assert {'vit_digits', 'vit_i1k'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_complete_and_documents_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'python -m train --config=configs/{name}.py' in module.__doc__
  config = module.get_config()
  assert not [f for f in loop.REQUIRED_FIELDS if f not in config]
  assert config.batch_size % (config.mesh.data if config.mesh.data > 0 else 1) == 0


def test_vit_i1k_is_the_documented_recipe_and_shrinks():
  from configs import vit_i1k
  c = vit_i1k.get_config()
  assert (c.batch_size, c.model.variant, c.optimizer.name, c.schedule.decay) == (4096, 'B/16', 'adamw', 'cosine')
  assert c.total_steps == 300 * 1_281_167 // 4096
  params = jax.eval_shape(lambda: loop.build_model(c).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == 86_567_656
  local = vit_i1k.get_config('runlocal=True,variant=S/16')
  assert (local.batch_size, local.total_steps, local.model.variant, local.model.depth) == (16, 20, 'S/16', 2)


def test_config_args_parse_and_reject_unknown_keys():
  arg = common.parse_arg('variant=L/14,runlocal=True,epochs=90', variant='B/16', runlocal=False, epochs=300)
  assert (arg.variant, arg.runlocal, arg.epochs) == ('L/14', True, 90)
  with pytest.raises(ValueError, match="config argument 'depth' is unknown"):
    common.parse_arg('depth=3', variant='B/16')


def test_mistral_7b_is_v01_at_pod_scale_and_shrinks():
  from configs import mistral_7b
  from train import sharding
  c = mistral_7b.get_config()
  assert (c.model.dtype, c.model.scan, c.model.remat, c.model.rope_theta) == ('bfloat16', True, 'save_proj', 1e4)
  assert loop.build_model(c) and __import__('models.mistral').mistral.param_count(c.model) == 7_241_732_096
  assert sharding.mesh_shape(c.mesh, 64) == (1, 16, 1, 4)
  assert c.model.num_kv_heads % c.mesh.tensor == 0  # K/V heads really split over the tensor axis
  rules = sharding.logical_rules(c.sharding_rules)
  assert dict(rules)['embed'] == 'fsdp' and dict(rules)['kv_heads'] == 'tensor'
  ft = mistral_7b.get_config('init=/ckpt/m7b')
  assert (ft.init_params, ft.data.tokenizer, ft.schedule.base_learning_rate) == ('/ckpt/m7b', '/ckpt/m7b/tokenizer.model', 1e-5)
  local = mistral_7b.get_config('runlocal=True')
  assert sharding.mesh_shape(local.mesh, 8) == (1, 2, 1, 4) and local.model.scan and local.model.dtype == 'bfloat16'
