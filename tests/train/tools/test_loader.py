"""The run loader: any model's run comes back with the parameters a user evaluates."""
import json
import re

import jax
import numpy as np
import pytest

from configs import nfnet_digits
from models import vit
from train import loop
from train.tools import loader


def _steps(c, n=2):
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = n, n, 0, n
  c.schedule.warmup_steps = 0
  return c


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_vit_run_with_a_frozen_base_and_ema_and_a_new_resolution(digits_dir, tmp_path, tiny_config):
  c = _steps(tiny_config(digits_dir, **{'optimizer.ema_decay': 0.5, 'adapter.name': 'freeze',
                                         'adapter.params': r'embedding/.*'}))
  out = loop.train(c, str(tmp_path))
  run = loader.load_run(str(tmp_path))
  assert run.step == 2 and run.example_input.shape == (1, 8, 8, 1)
  # The EMA copy of the trainable parameters, and the frozen embedding rebuilt from the seed.
  _equal(run.params['encoder'], out['state']['ema']['encoder'])
  _equal(run.params['embedding'], out['frozen']['base']['embedding'])
  images = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
  assert run.model.apply({'params': run.params}, images).shape == (2, 10)
  # At 16x16 pixels: 16 patches instead of 4; the model's own hook resamples the position embedding.
  bigger = loader.load_run(str(tmp_path), input_shape=(1, 16, 16, 1))
  assert bigger.params['pos_embedding'].shape[-2] == 16 and run.params['pos_embedding'].shape[-2] == 4
  np.testing.assert_allclose(np.asarray(bigger.params['pos_embedding']),
                             np.asarray(vit.resize_posemb(run.params['pos_embedding'], (4, 4), 0)), rtol=1e-6)
  assert bigger.model.apply({'params': bigger.params}, np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 10)
  with pytest.raises(FileNotFoundError, match=r'has no step 7; it has \[2\]'):
    loader.load_run(str(tmp_path), step=7)
  # A config.json that says fewer blocks than the checkpoint holds: refused, never a partial restore.
  config = json.loads((tmp_path / 'config.json').read_text())
  config['model']['depth'] = 1
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))} step 2: parameter 'encoder/block_1/\S+' has shape "
                                       r'\(\d+(, \d+)*\) there but is absent in this model;'):
    loader.load_run(str(tmp_path))


def test_nfnet_and_mistral_runs(digits_dir, tmp_path, tiny_mistral_config):
  c = _steps(nfnet_digits.get_config())
  c.model.update(widths=(16, 32), depths=(1, 1), stem_widths=(8, 8, 8, 8))
  c.data.data_dir, c.batch_size, c.eval_batch_size = digits_dir, 16, 120
  out = loop.train(c, str(tmp_path / 'nfnet'))
  run = loader.load_run(str(tmp_path / 'nfnet'))
  _equal(run.params, out['state']['ema'])  # nfnet_digits keeps an EMA: that is what is evaluated.
  out = loop.train(_steps(tiny_mistral_config, 1), str(tmp_path / 'mistral'))
  run = loader.load_run(str(tmp_path / 'mistral'))
  assert run.step == 1 and run.example_input.dtype == np.int32
  _equal(run.params, out['state']['trainable'])
