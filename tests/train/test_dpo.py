"""The `preference` objective (DPO and its variants) against TRL: a tiny random HF MistralForCausalLM and a second one
as the reference, converted to ours, scored on pairs of very different lengths; the loss and every reward metric
equal TRL's own DPO computation (DPOTrainer._compute_loss, fed TRL's collated batch) of the same pairs."""
import collections
import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from trl.trainer import dpo_trainer
from trl.trainer.utils import add_fused_lm_head

from models import mistral, mistral_weights
from train import objectives

HF_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=64, vocab_size=61, sliding_window=6, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
# (prompt, chosen, rejected) token ids: prompts of different lengths, responses of 1 to 11 tokens, the chosen
# one sometimes far shorter than the rejected one and sometimes far longer.
PAIRS = [([5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]),
         ([3, 4, 5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [31]),
         ([40], [41, 42, 43, 44], [45, 46, 47, 48, 49])]


def _hf(seed):
  torch.manual_seed(seed)
  return transformers.MistralForCausalLM(transformers.MistralConfig(**HF_CFG, attn_implementation='eager')).float()


@pytest.fixture(scope='module')
def models():
  policy, reference = _hf(0), _hf(1)
  converted = []
  for hf in (policy, reference):
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    kwargs, params = mistral_weights.from_hf(hf.config.to_dict(), sd)
    converted.append((kwargs, params))
  ours = mistral.Model(**converted[0][0], scan=False, attention_impl='masked')
  for hf in (policy, reference):
    add_fused_lm_head(hf, outputs=('log_probs', 'entropy', 'mean_logits', 'is_top1'))
  return policy, reference, ours, converted[0][1], converted[1][1]


def _trl_inputs(pairs):
  """TRL's collated batch: the chosen rows, then the rejected rows, prompt + response, right-padded."""
  rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
  length = max(len(p) + len(c) for p, c in rows)
  ids, attention, completion = (torch.zeros(len(rows), length, dtype=torch.long) for _ in range(3))
  for i, (p, c) in enumerate(rows):
    ids[i, :len(p) + len(c)] = torch.tensor(p + c)
    attention[i, :len(p) + len(c)] = 1
    completion[i, len(p):len(p) + len(c)] = 1
  return {'input_ids': ids, 'attention_mask': attention, 'completion_mask': completion}


def _our_batch(pairs):
  """Our preference batch [B, 2, L]: each pair's rows side by side, targets the next token, loss on the response."""
  trl = _trl_inputs(pairs)
  b = len(pairs)
  ids, attention, completion = (trl[k].numpy().astype(np.int32) for k in ('input_ids', 'attention_mask',
                                                                           'completion_mask'))
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  loss_mask = np.zeros_like(ids)
  loss_mask[:, :-1] = completion[:, 1:]
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  pair = lambda x: jnp.asarray(np.stack([x[:b], x[b:]], axis=1))  # [2B, L] -> [B, 2, L]
  return {'tokens': pair(ids), 'targets': pair(targets), 'loss_mask': pair(loss_mask),
          'segment_ids': pair(attention), 'positions': pair(positions)}


def _trl_loss(policy, reference, inputs, loss_type, beta, label_smoothing):
  """DPOTrainer._compute_loss itself on `inputs`, with what it reads of the trainer given directly."""
  accelerator = types.SimpleNamespace(device=torch.device('cpu'), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                      unwrap_model=lambda m: m)
  trainer = types.SimpleNamespace(
      model=policy, ref_model=reference, accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=False,
      args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), ld_alpha=None, f_divergence_type='reverse_kl',
      beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing, use_weighting=False,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
  policy.eval(), reference.eval()
  with torch.no_grad():
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
  return float(loss), {k: v[-1] for k, v in trainer._metrics['eval'].items()}


METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
           'logps/rejected')


@pytest.mark.parametrize('loss, beta, smoothing', [('sigmoid', 0.1, 0.0), ('robust', 0.5, 0.2), ('ipo', 0.3, 0.0)])
def test_loss_and_rewards_equal_trl(models, loss, beta, smoothing):
  policy, reference, ours, params, ref_params = models
  task = objectives.make_objective({'name': 'preference', 'loss': loss, 'beta': beta, 'label_smoothing': smoothing})
  assert task.frozen_needs == ('reference',)
  batch = _our_batch(PAIRS)
  loss_sum, sums = task.loss(ours, params, {'reference': ref_params}, batch, None, train=False)
  want_loss, want = _trl_loss(policy, reference, _trl_inputs(PAIRS), loss, beta, smoothing)
  assert float(sums['weight']) == len(PAIRS)
  np.testing.assert_allclose(float(loss_sum / sums['weight']), want_loss, rtol=1e-5, atol=1e-5)
  got = task.train_summary(sums)
  for name in METRICS:
    np.testing.assert_allclose(float(got[f'train/{name}']), want[name], rtol=1e-5, atol=1e-5, err_msg=name)
  # Different lengths in one batch: the rewards are not all of one sign, so accuracy is a real fraction here.
  assert round(3 * want['rewards/accuracies']) in (1, 2), want


def test_conservative_dpo_is_the_label_flip_mixture_of_trl_losses(models):
  """Conservative DPO (sigmoid with label_smoothing eps) is, by its definition, (1 - eps) x the DPO loss of the
  pairs plus eps x the DPO loss of the pairs with chosen and rejected swapped: both from TRL."""
  policy, reference, ours, params, ref_params = models
  eps, beta = 0.25, 0.2
  task = objectives.make_objective({'name': 'preference', 'loss': 'sigmoid', 'beta': beta, 'label_smoothing': eps})
  loss_sum, sums = task.loss(ours, params, {'reference': ref_params}, _our_batch(PAIRS), None, train=False)
  straight, _ = _trl_loss(policy, reference, _trl_inputs(PAIRS), 'sigmoid', beta, 0.0)
  flipped, _ = _trl_loss(policy, reference, _trl_inputs([(p, r, c) for p, c, r in PAIRS]), 'sigmoid', beta, 0.0)
  np.testing.assert_allclose(float(loss_sum / sums['weight']), (1 - eps) * straight + eps * flipped, rtol=1e-5)


def test_each_response_is_scored_whole_and_beta_applies_once(models):
  """The documented historical bugs: both responses cut to the shorter one, and beta squared. A pair's policy
  log-probability is the sum over its own response; doubling beta doubles the rewards, not quadruples them."""
  _, _, ours, params, ref_params = models
  task = objectives.make_objective({'name': 'preference', 'beta': 0.1})
  batch = _our_batch(PAIRS[:1])  # chosen 2 tokens, rejected 9
  _, sums = task.loss(ours, params, {'reference': ref_params}, batch, None, train=False)
  logits = ours.apply({'params': params}, batch['tokens'][0], segment_ids=batch['segment_ids'][0],
                      positions=batch['positions'][0])
  token_logps = jnp.take_along_axis(jax.nn.log_softmax(logits), batch['targets'][0][..., None], -1)[..., 0]
  expected = (token_logps * batch['loss_mask'][0]).sum(-1)
  assert batch['loss_mask'][0].sum(-1).tolist() == [2, 9]
  np.testing.assert_allclose([float(sums['logps_chosen']), float(sums['logps_rejected'])], expected, rtol=1e-5)
  doubled = objectives.make_objective({'name': 'preference', 'beta': 0.2})
  _, sums2 = doubled.loss(ours, params, {'reference': ref_params}, batch, None, train=False)
  np.testing.assert_allclose(float(sums2['rewards_margin']), 2 * float(sums['rewards_margin']), rtol=1e-5)


def test_bad_settings_are_one_line():
  for fields, message in [({'loss': 'kto'}, "task.loss='kto' is unknown"), ({'beta': 0.0}, 'task.beta=0.0 must be > 0'),
                          ({'label_smoothing': 0.5}, r'task.label_smoothing=0.5 must be in \[0, 0.5\)'),
                          ({'reference': 'copy'}, "task.reference='copy' is unknown")]:
    with pytest.raises(ValueError, match=message):
      objectives.make_objective({'name': 'preference', **fields})


def _pairs_corpus(root):
  root.mkdir()
  rng = np.random.default_rng(0)
  with open(root / 'pairs.jsonl', 'w') as f:
    for i in range(80):
      a, b = (int(x) for x in rng.integers(0, 50, 2))
      f.write(json.dumps({'prompt': f'What is {a} plus {b}?', 'chosen': f'{a} plus {b} is {a + b}.',
                          'rejected': f'It is {int(rng.integers(0, 99))}, I think.'}) + '\n')
  return str(root / '*.jsonl')


def _dpo_config(config, tmp_path, **task):
  config.data = ml_collections.ConfigDict(dict(
      format='preference', files=_pairs_corpus(tmp_path / 'pairs'), data_dir=str(tmp_path / 'tfds'), template='zephyr',
      tokenizer='bytes', max_length=48, max_prompt_length=24, num_threads=1, prefetch=1))
  config.task = ml_collections.ConfigDict({'name': 'preference', 'beta': 0.1, **task})
  config.batch_size = config.eval_batch_size = 4
  config.total_steps, config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 3, 1, 3, 3
  config.schedule.warmup_steps = 1
  config.eval_at_start = False
  return config


def _train_metrics(workdir):
  from train import metrics as metrics_lib
  return [{k: v for k, v in r.items() if k.startswith('train/')} for r in metrics_lib.read_metrics(str(workdir))]


def test_a_dpo_run_starts_at_log_2_and_adapters_off_equals_a_frozen_copy(tiny_mistral_config, tmp_path):
  """Through the loop: the policy starts as its reference, so the first DPO loss is log 2 and every reward 0. With
  LoRA, the reference as the same model with its adapters off (no second copy) trains exactly as one with an
  explicit frozen copy of the starting parameters."""
  import copy
  from train import loop
  base = _dpo_config(tiny_mistral_config, tmp_path)
  base.adapter = ml_collections.ConfigDict(dict(name='lora', rank=4, alpha=8.0, dropout=0.0))
  copied = copy.deepcopy(base)
  copied.frozen = ml_collections.ConfigDict({'reference': 'init'})
  off = copy.deepcopy(base)
  off.task.reference = 'adapters_off'
  results = {name: loop.train(c, str(tmp_path / name), devices=jax.devices()[:1])
             for name, c in (('copy', copied), ('off', off))}
  first = _train_metrics(tmp_path / 'copy')[0]
  assert first['train/loss'] == pytest.approx(np.log(2), abs=1e-6)
  assert first['train/rewards/margins'] == pytest.approx(0.0, abs=1e-6)
  for a, b in zip(_train_metrics(tmp_path / 'copy'), _train_metrics(tmp_path / 'off')):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
  assert 'reference' in results['copy']['frozen'] and 'reference' not in results['off']['frozen']
  assert 0 < results['off']['eval']['eval/pairs'] and np.isfinite(results['off']['eval']['eval/loss'])


def test_precomputed_reference_logps_train_as_a_frozen_reference(tiny_mistral_config, tmp_path):
  """`python -m train.reference_logps`'s pass: a DPO run from a finished run (its init_params) reading the stored
  reference log-probabilities trains exactly as one holding a frozen copy of that run; a pair encoded otherwise
  (another max_length) is not found, and says so."""
  import copy
  from train import loop
  from train.tools import reference_logps
  start = _dpo_config(tiny_mistral_config, tmp_path)
  start.total_steps = start.checkpoint_every_steps = start.eval_every_steps = 2
  start.frozen = ml_collections.ConfigDict({'reference': 'init'})
  loop.train(start, str(tmp_path / 'sft'), devices=jax.devices()[:1])
  frozen = copy.deepcopy(start)
  frozen.init_params = str(tmp_path / 'sft')
  stored = copy.deepcopy(frozen)
  del stored.frozen
  stored.task.reference = 'precomputed'
  stored.data.ref_logps = str(tmp_path / 'ref.npz')
  keys, logps = reference_logps.compute(stored, batch_size=4)
  assert len(keys) == len(set(keys)) > 8 and logps.shape == (len(keys), 2) and np.all(logps < 0)
  reference_logps.write(stored.data.ref_logps, keys, logps)
  loop.train(frozen, str(tmp_path / 'frozen'), devices=jax.devices()[:1])
  loop.train(stored, str(tmp_path / 'stored'), devices=jax.devices()[:1])
  for a, b in zip(_train_metrics(tmp_path / 'frozen'), _train_metrics(tmp_path / 'stored'), strict=True):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
  other = copy.deepcopy(stored)
  other.data.max_length = 40
  with pytest.raises(ValueError, match='missing from data.ref_logps=.*rerun python -m train.reference_logps'):
    loop.train(other, str(tmp_path / 'other'), devices=jax.devices()[:1])
