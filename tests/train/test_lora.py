"""LoRA on the Mistral decoder against peft: an adapter with random factors exported in peft's format and loaded by
peft onto the converted HF model gives our logits; the merged export does too. The adapted model starts equal to
its base, dropout acts in training only, and only the factors train."""
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import mistral, mistral_weights
from train import adapters, lora, loop, runs
from train.tools import convert

HF_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=64, vocab_size=61, sliding_window=6, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False)


@pytest.fixture(scope='module')
def hf_base():
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(transformers.MistralConfig(**HF_CFG, attn_implementation='eager'))
  return model.float().eval()


def _converted(hf_model, scan):
  sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
  kwargs, params = mistral_weights.from_hf(hf_model.config.to_dict(), sd)
  params = mistral_weights.stack_layers(params) if scan else params
  return {**kwargs, 'scan': scan, 'attention_impl': 'masked'}, params


def _random_factors(adapter, model, base, seed=1):
  """The adapter's factors as the wrapped model creates them, then redrawn at random (lora_b too, unlike init)."""
  boxed = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32))['params'])
  trainable, _ = adapter.split(nn.unbox(boxed))
  flat = traverse_util.flatten_dict(trainable, sep='/')
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict(
      {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) for k, v in flat.items()}, sep='/')


@pytest.mark.parametrize('scan', [False, True], ids=['layers', 'scanned'])
def test_peft_loads_our_adapter_and_the_merged_export_equals_it(hf_base, tmp_path, scan):
  import peft
  kwargs, base = _converted(hf_base, scan)
  adapter = lora.Lora(rank=4, alpha=8.0, rslora=scan)  # Both scalings: alpha / r and alpha / sqrt(r).
  model = adapter.wrap(mistral.Model(**kwargs))
  trainable = _random_factors(adapter, model, base)
  tokens = np.random.default_rng(0).integers(0, HF_CFG['vocab_size'], (2, 11))
  ours = np.asarray(model.apply({'params': adapter.merge(trainable, base)}, jnp.asarray(tokens)))

  config = convert.write_peft(trainable, adapter, str(tmp_path / 'peft'))
  assert config['target_modules'] == ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
  hf = transformers.MistralForCausalLM(hf_base.config).float().eval()
  hf.load_state_dict(hf_base.state_dict())
  adapted = peft.PeftModel.from_pretrained(hf, str(tmp_path / 'peft')).eval()
  with torch.no_grad():
    want = adapted(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=1e-5)
  assert np.abs(ours - np.asarray(mistral.Model(**kwargs).apply({'params': base}, jnp.asarray(tokens)))).max() > 1e-2

  hf_config, state_dict = mistral_weights.to_hf(kwargs, jax.tree.map(np.asarray, adapter.export(trainable, base)))
  merged = transformers.MistralForCausalLM(transformers.MistralConfig(**hf_config, attn_implementation='eager'))
  merged.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
  with torch.no_grad():
    np.testing.assert_allclose(ours, merged.float().eval()(torch.from_numpy(tokens)).logits.numpy(), atol=1e-5,
                               rtol=1e-5)


def test_starts_equal_to_its_base_and_drops_out_only_in_training(hf_base):
  kwargs, base = _converted(hf_base, scan=False)
  adapter = lora.Lora(rank=2, alpha=4.0, dropout=0.5)
  model = adapter.wrap(mistral.Model(**kwargs))
  params = nn.unbox(model.init({'params': jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32))['params'])
  trainable, _ = adapter.split(params)
  flat = traverse_util.flatten_dict(trainable, sep='/')
  assert len(flat) == 2 * 7 * 2 and all(not v.any() for k, v in flat.items() if k.endswith('lora_b'))
  a = flat['layer_0/attn/query/lora_a']
  assert a.shape == (32, 2) and 0 < np.abs(a).max() <= 1 / np.sqrt(32)  # U(+-1/sqrt(fan_in)), as peft draws it.
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (1, 9)))
  plain = mistral.Model(**kwargs).apply({'params': base}, tokens)
  np.testing.assert_array_equal(model.apply({'params': adapter.merge(trainable, base)}, tokens), plain)
  noisy = _random_factors(adapter, model, base)
  merged = adapter.merge(noisy, base)
  evaluated = model.apply({'params': merged}, tokens)
  np.testing.assert_array_equal(model.apply({'params': merged}, tokens), evaluated)  # No rng: no dropout.
  dropped = model.apply({'params': merged}, tokens, rngs={'dropout': jax.random.key(1)})
  assert np.abs(np.asarray(dropped) - np.asarray(evaluated)).max() > 1e-3


def test_a_lora_run_trains_and_saves_only_the_factors(tmp_path, tiny_mistral_config):
  config = tiny_mistral_config
  config.adapter = dict(name='lora', rank=2, alpha=4.0, dropout=0.0)
  config.total_steps, config.checkpoint_every_steps, config.log_every_steps, config.eval_every_steps = 3, 3, 1, 0
  config.schedule.warmup_steps = 1
  config.eval_at_start = False
  out = loop.train(config, str(tmp_path / 'run'))
  stored = runs.stored_param_shapes(str(tmp_path / 'run'))
  assert stored and all(n.rsplit('/', 1)[-1] in ('lora_a', 'lora_b') for n in stored)
  assert stored['layer_0/attn/out/lora_a'] == (4, 8, 2) and stored['layer_0/attn/out/lora_b'] == (2, 32)
  # The frozen base is the seeded init, unchanged; the run loader merges the trained factors into it.
  from train.tools import loader
  run = loader.load_run(str(tmp_path / 'run'))
  want = lora.Lora(rank=2, alpha=4.0).export(out['state']['trainable'], out['frozen']['base'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), jax.device_get(want))
  assert not any('lora' in k for k in traverse_util.flatten_dict(run.params, sep='/'))


def test_a_regex_matching_no_kernel_is_one_line(tmp_path, tiny_mistral_config):
  config = tiny_mistral_config
  config.adapter = dict(name='lora', params='.*/nothing/kernel')
  with pytest.raises(ValueError, match=r"adapter.params='.\*/nothing/kernel' matches no projection kernel \(a regex "
                                       r"matched in full against names like 'head/kernel', 'layer_0/attn/key/kernel'"):
    loop.train(config, str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='adapter.rank=0 must be a whole number >= 1'):
    adapters.make_adapter({'name': 'lora', 'rank': 0})


def test_a_half_precision_base_halves_the_frozen_bytes(hf_base):
  """adapter.base_dtype='bfloat16': the frozen base's floats are stored in bf16 (the factors stay float32), and
  the adapted model computes as the plain model does on that bf16 copy; QLoRA's NF4 scales stay float32."""
  kwargs, base = _converted(hf_base, scan=False)
  adapter = lora.Lora(rank=2, alpha=4.0, base_dtype='bfloat16')
  model = adapter.wrap(mistral.Model(**kwargs))
  params = nn.unbox(model.init({'params': jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32))['params'])
  params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(base)})
  trainable, frozen = adapter.split(params)
  flat = traverse_util.flatten_dict(frozen, sep='/')
  assert {str(v.dtype) for v in flat.values()} == {"bfloat16"}
  assert {str(v.dtype) for v in jax.tree.leaves(trainable)} == {"float32"}
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (1, 9)))
  half = jax.tree.map(lambda v: v.astype(jnp.bfloat16), base)
  np.testing.assert_array_equal(model.apply({'params': adapter.merge(trainable, frozen)}, tokens),
                                mistral.Model(**kwargs).apply({'params': half}, tokens))
  quantized = traverse_util.flatten_dict(lora.QLora(rank=2, base_dtype='bfloat16').split(params)[1], sep='/')
  assert quantized['layer_0/mlp/up/kernel_nf4'].dtype == jnp.uint8
  assert quantized['layer_0/mlp/up/kernel_scale'].dtype == jnp.float32 and quantized['embedding'].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="adapter.base_dtype='int8' is not a floating dtype"):
    lora.Lora(base_dtype='int8')
