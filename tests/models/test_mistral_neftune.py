"""NEFTune on the Mistral decoder: noise only in training, bounded by alpha / sqrt(L * d) with L each segment's
own length (or the padded row length, as transformers' hook does), uniform, and none in generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.integrations import neftune as hf_neftune

from models import mistral

KWARGS = dict(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, sliding_window=6,
              vocab_size=50, norm_eps=1e-5, rope_theta=10000.0, block_size=4)
ALPHA = 5.0
# One packed row: a 5-token segment, a 9-token segment, 2 padding tokens.
SEGMENTS = np.array([[1] * 5 + [2] * 9 + [0] * 2])
POSITIONS = np.array([list(range(5)) + list(range(9)) + [0, 0]])


@pytest.fixture(scope='module')
def params():
  model = mistral.Model(**KWARGS)
  return model.init({'params': jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32))['params']


def _noise(length_mode: str, batch: int, key=1):
  model = mistral.Model(**KWARGS, embed_noise_alpha=ALPHA, embed_noise_length=length_mode)
  x = jnp.zeros((batch, SEGMENTS.shape[1], KWARGS['embed_dim']))
  seg = jnp.asarray(np.repeat(SEGMENTS, batch, 0))
  return np.asarray(model.apply({}, x, seg, method=lambda m, x, s: m._embed_noise(x, s),
                                rngs={'dropout': jax.random.key(key)}))


def test_noise_is_bounded_per_segment_and_uniform():
  noise = _noise('segment', batch=400)
  d = KWARGS['embed_dim']
  bounds = {1: ALPHA / np.sqrt(5 * d), 2: ALPHA / np.sqrt(9 * d)}
  for segment, bound in bounds.items():
    values = noise[:, SEGMENTS[0] == segment].ravel()
    assert np.abs(values).max() <= bound * (1 + 1e-6)
    assert np.abs(values).max() > 0.999 * bound  # The bound is the scale itself, not a loose cap.
    # U(-1, 1) after scaling: a Kolmogorov-Smirnov test at a fixed seed, and its first two moments.
    scaled = values / bound
    assert scipy.stats.kstest(scaled, scipy.stats.uniform(loc=-1, scale=2).cdf).pvalue > 0.01
    assert abs(scaled.mean()) < 0.02 and abs(scaled.var() - 1 / 3) < 0.01
  assert not noise[:, SEGMENTS[0] == 0].any()  # Padding gets none.


def test_padded_mode_uses_the_row_length_like_transformers_hook():
  noise = _noise('padded', batch=200)
  t, d = SEGMENTS.shape[1], KWARGS['embed_dim']
  bound = ALPHA / np.sqrt(t * d)
  assert np.abs(noise).max() <= bound * (1 + 1e-6) and np.abs(noise).max() > 0.999 * bound
  assert np.abs(noise[:, SEGMENTS[0] == 0]).max() > 0.99 * bound  # Padding too.
  # transformers' hook on an embedding output of the same shape: the same scale, padding included.
  embedding = torch.nn.Embedding(10, d)
  embedding.neftune_noise_alpha = ALPHA
  embedding.train()
  output = torch.zeros(200, t, d)
  hf = hf_neftune.neftune_post_forward_hook(embedding, None, output).numpy()
  assert np.abs(hf).max() <= bound * (1 + 1e-6) and np.abs(hf).max() > 0.999 * bound
  np.testing.assert_allclose(np.abs(noise).max(), np.abs(hf).max(), rtol=1e-3)


def test_noise_only_in_training_never_in_eval_or_generation(params):
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 50, SEGMENTS.shape))
  quiet, noisy = mistral.Model(**KWARGS), mistral.Model(**KWARGS, embed_noise_alpha=ALPHA)
  args = dict(segment_ids=jnp.asarray(SEGMENTS), positions=jnp.asarray(POSITIONS))
  rngs = {'dropout': jax.random.key(3)}
  base = quiet.apply({'params': params}, tokens, **args)
  np.testing.assert_array_equal(noisy.apply({'params': params}, tokens, **args), base)  # train=False: eval
  np.testing.assert_array_equal(quiet.apply({'params': params}, tokens, **args, train=True, rngs=rngs), base)
  trained = noisy.apply({'params': params}, tokens, **args, train=True, rngs=rngs)
  assert np.abs(np.asarray(trained) - np.asarray(base)).max() > 1e-4  # The noise reaches the logits.
  prompt = tokens[:, :6]
  want = mistral.generate(quiet, params, prompt, 8)
  np.testing.assert_array_equal(mistral.generate(noisy, params, prompt, 8), want)


def test_bad_noise_settings_are_refused(params):
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match='embed_noise_alpha must be >= 0'):
    mistral.Model(**KWARGS, embed_noise_alpha=-1.0).apply({'params': params}, tokens)
  with pytest.raises(ValueError, match="embed_noise_length must be one of \\('segment', 'padded'\\)"):
    mistral.Model(**KWARGS, embed_noise_length='row').apply({'params': params}, tokens)
