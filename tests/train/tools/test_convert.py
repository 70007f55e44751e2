"""train.convert: HF / original Mistral weights -> orbax params the loop finetunes from, and back to HF."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from data import tokenizers
from train import loop
from train import metrics as metrics_lib
from train.tools import convert, loader

REPO = __file__.rsplit('/tests/', 1)[0]
HF_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=64, vocab_size=320, sliding_window=8, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A random tiny MistralForCausalLM saved in several safetensors shards, with a tokenizer.model."""
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(transformers.MistralConfig(**HF_CFG, attn_implementation='eager'))
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
  path = tmp_path_factory.mktemp('hf')
  model.save_pretrained(path, max_shard_size='40KB')
  text = ['def f(x):\n    return x + 1\n', 'the quick brown fox jumps over the lazy dog'] * 50
  tokenizers.train_sentencepiece(text, str(path / 'tokenizer'), vocab_size=300)
  return path


def _hf_state(path) -> dict:
  model = transformers.MistralForCausalLM.from_pretrained(path, attn_implementation='eager').float().eval()
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}, model


def _logits(model_kwargs, params, tokens):
  from models import mistral
  return np.asarray(mistral.Model(**model_kwargs).apply({'params': params}, tokens))


@pytest.mark.parametrize('scan', [False, True])
def test_import_streams_shards_and_matches_hf_logits(hf_dir, tmp_path, scan):
  assert len(list(hf_dir.glob('model-*.safetensors'))) > 2
  kwargs = convert.import_model(str(hf_dir), str(tmp_path / 'imported'), scan=scan)
  assert kwargs['scan'] == scan and kwargs['sliding_window'] == 8
  config, model, params, step = loader.load(str(tmp_path / 'imported'))
  assert step is None and ('layers' in params) == scan
  _, hf_model = _hf_state(hf_dir)
  tokens = np.random.default_rng(0).integers(0, 320, (2, 19)).astype(np.int32)  # longer than the window
  with torch.no_grad():
    want = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(_logits(kwargs, params, tokens), want, atol=1e-5, rtol=0)
  assert tokenizers.get_tokenizer(config.data.tokenizer).decode([5, 6]) is not None


def test_original_format_import_matches_hf_import(hf_dir, tmp_path, original_state_dict):
  from safetensors.numpy import save_file
  hf_sd, _ = _hf_state(hf_dir)
  src = tmp_path / 'original'
  src.mkdir()
  save_file(original_state_dict(hf_sd, HF_CFG['head_dim']), str(src / 'consolidated.safetensors'))
  (src / 'params.json').write_text(json.dumps(dict(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4,
                                                   n_kv_heads=2, norm_eps=1e-5, sliding_window=8, vocab_size=320)))
  cli = [sys.executable, '-m', 'train.convert', 'import', f'--src={src}', f'--out={tmp_path / "o"}',
         '--format=original']
  failed = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
  assert failed.returncode == 2 and failed.stderr.strip().startswith('error: params.json has no rope_theta')
  subprocess.run(cli + ['--rope_theta=10000'], cwd=REPO, check=True, capture_output=True)
  convert.import_model(str(hf_dir), str(tmp_path / 'h'))
  *_, from_original, _ = loader.load(str(tmp_path / 'o'))
  *_, from_hf, _ = loader.load(str(tmp_path / 'h'))
  jax.tree.map(np.testing.assert_array_equal, from_original, from_hf)


def test_finetune_from_import_then_export_round_trips(hf_dir, tmp_path, tiny_mistral_config):
  """The loop starts from the imported weights (lr 0 keeps them), and export gives HF back its tensors."""
  imported = tmp_path / 'imported'
  convert.import_model(str(hf_dir), str(imported))
  c = tiny_mistral_config  # the HF model's shapes (HF_CFG)
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1, 1, 1
  c.schedule.base_learning_rate, c.schedule.warmup_steps = 0.0, 0
  c.init_params = str(imported)
  c.model.num_layers = 3
  # The first parameter the imported 2 layers lack, named with its shape.
  with pytest.raises(ValueError, match=r"parameter 'layer_2/attn/key/kernel' is absent there but has shape \(32, 2, 8\)"):
    loop.train(c, str(tmp_path / 'bad'))
  c.model.num_layers = 2
  c.eval_at_start = True
  out = loop.train(c, str(tmp_path / 'workdir'))
  first, last = metrics_lib.read_metrics(str(tmp_path / 'workdir'))
  assert first['step'] == 0 and first['eval/loss'] == last['eval/loss']  # lr 0: the imported model throughout
  *_, imported_params, _ = loader.load(str(imported))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out['state']['trainable']), imported_params)

  convert.export_model(str(tmp_path / 'workdir'), str(tmp_path / 'hf_out'), max_shard_bytes=30_000)
  index = json.loads((tmp_path / 'hf_out' / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 2
  want, _ = _hf_state(hf_dir)
  got, _ = _hf_state(tmp_path / 'hf_out')
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  convert.export_model(str(imported), str(tmp_path / 'hf_bf16'), dtype='bfloat16')
  half = transformers.MistralForCausalLM.from_pretrained(tmp_path / 'hf_bf16')
  assert half.dtype == torch.bfloat16
  np.testing.assert_allclose(half.model.norm.weight.detach().float().numpy(), want['model.norm.weight'], rtol=1e-2)


@pytest.mark.parametrize('config_json, line', [
    (None, 'error: {src}/config.json not found; --src must be a model directory with its config.'),
    ('{"hidden_size": 32,\x00garbage', 'error: {src}/config.json is not valid JSON (Expecting property name '
                                       'enclosed in double quotes: line 1 column 20 (char 19)); replace it with the '
                                       'file the model was released with.'),
    ('[1, 2]', 'error: {src}/config.json holds a JSON list, not an object of settings; replace it with the file '
               'the model was released with.'),
    ('{"hidden_size": 32}', "error: {src}/config.json lacks 'num_attention_heads'; is it the config of a Mistral "
                            'model?'),
])
def test_a_bad_source_is_named_in_one_line(tmp_path, config_json, line):
  src = tmp_path / 'src'
  src.mkdir()
  if config_json is not None:
    (src / 'config.json').write_text(config_json)
  result = subprocess.run([sys.executable, '-m', 'train.convert', 'import', f'--src={src}',
                           f'--out={tmp_path / "o"}'], cwd=REPO, capture_output=True, text=True)
  assert (result.returncode, result.stderr.splitlines()) == (2, [line.format(src=src)]), result.stderr
