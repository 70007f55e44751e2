"""train.judge: mean token log-likelihoods equal HF transformers' for the same model, Zephyr's binarization (argmax
chosen, seeded rejected never the chosen text, skips counted), pairs that data/preference_data.py reads, and
bad input ending with one line and exit 2."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from data import chat, preference_data, tokenizers
from train import runs
from train.tools import convert, judge, loader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HF_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=64, vocab_size=320, sliding_window=8, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
USER = [{'role': 'user', 'content': 'What is the quick fox?'}]
LONG = 'the quick brown fox jumps over the lazy dog, ' * 3  # past one 64-token bucket


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """(an imported random tiny Mistral with a SentencePiece tokenizer, the same model in HF transformers)."""
  torch.manual_seed(0)
  hf = transformers.MistralForCausalLM(transformers.MistralConfig(**HF_CFG, attn_implementation='eager'))
  with torch.no_grad():
    for p in hf.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
  src = tmp_path_factory.mktemp('hf')
  hf.save_pretrained(src)
  tokenizers.train_sentencepiece(['def f(x):\n    return x + 1\n', LONG] * 50, str(src / 'tokenizer'),
                                 vocab_size=300)
  out = str(tmp_path_factory.mktemp('judge'))
  convert.import_model(str(src), out)
  return out, hf.eval()


def _hf_mean_loglik(hf, tokens, mask):
  """The mean over the tokens `mask` marks of log_softmax(HF logits) at the position before each."""
  with torch.no_grad():
    logits = hf(torch.from_numpy(np.asarray(tokens)[None]).long()).logits[0].double()
  logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.from_numpy(np.asarray(tokens[1:])).long()[:, None])
  return float(logp[:, 0].numpy()[np.asarray(mask[1:], bool)].mean())


def test_loglik_equals_hf_for_answers_of_different_lengths_in_one_batch(imported):
  path, hf = imported
  run = loader.load_run(path)
  tok = tokenizers.get_tokenizer(run.config.data.tokenizer)
  turns = USER + [{'role': 'assistant', 'content': 'A fox.'}, {'role': 'user', 'content': 'And the dog?'}]
  items = [(USER, 'A fox.'), (USER, LONG), (turns, 'lazy'), (USER, '')]
  got = judge.score(run, tok, 'zephyr', items, 'loglik', batch_size=3)
  for (prompt, answer), (value, n) in zip(items, got):
    tokens, weights = chat.encode(prompt + [{'role': 'assistant', 'content': answer}], tok, 'zephyr')
    weights[:len(chat.encode(prompt, tok, 'zephyr', add_generation_prompt=True)[0])] = 0  # earlier replies
    assert n == weights.sum()
    assert abs(value - _hf_mean_loglik(hf, tokens, weights)) < 1e-5, (answer, value)
  # Cut to 20 tokens: a prompt loses its start, an answer that alone does not fit is not scored.
  cut = judge.score(run, tok, 'zephyr', [(USER, 'A fox.'), (USER, LONG)], 'loglik', max_length=20)
  tokens, weights = chat.encode(USER + [{'role': 'assistant', 'content': 'A fox.'}], tok, 'zephyr')
  end = np.flatnonzero(weights)[-1] + 1
  assert abs(cut[0][0] - _hf_mean_loglik(hf, tokens[end - 20:end], weights[end - 20:end])) < 1e-5
  assert cut[1] == (None, got[1][1])


def _candidate(prompt_id, source, sample, answer, score):
  return judge.Candidate(prompt_id, USER, answer, source, sample, f'{source}:{sample}', score=score)


def test_binarize_chooses_the_best_and_draws_a_seeded_rejected_of_another_text():
  groups = {
      'p': [_candidate('p', 'a', 0, 'ok', -2.0), _candidate('p', 'b', 0, 'best', -1.0),
            _candidate('p', 'c', 0, 'best', -1.0), _candidate('p', 'd', 0, 'bad', -3.0),
            _candidate('p', 'a', 1, 'meh', -2.5)],
      'tie': [_candidate('tie', 'b', 0, 'second', 1.0), _candidate('tie', 'a', 3, 'first', 1.0)],
      'one': [_candidate('one', 'a', 0, 'alone', 0.0)],
      'same': [_candidate('same', 'a', 0, 'x', 0.0), _candidate('same', 'b', 0, 'x', 1.0)],
  }
  pairs, skipped = judge.binarize(groups, seed=0)
  assert skipped == {'single candidate': 1, 'identical answers': 1}
  by_id = {p['prompt_id']: p for p in pairs}
  assert by_id['tie']['chosen'][-1]['content'] == 'first' and by_id['tie']['source_chosen'] == 'a'
  assert (by_id['p']['chosen'][-1]['content'], by_id['p']['source_chosen'], by_id['p']['score_chosen']) == (
      'best', 'b', -1.0)
  rejected = {judge.binarize(groups, seed=s)[0][0]['rejected'][-1]['content'] for s in range(40)}
  assert rejected == {'ok', 'bad', 'meh'}  # every other text, never the chosen one's (also from 'c')
  shuffled = {k: random.Random(1).sample(v, len(v)) for k, v in reversed(groups.items())}
  for seed in (0, 7):
    assert judge.binarize(shuffled, seed) == judge.binarize(groups, seed)


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _rows(source, answers, tokenizer=None):
  return [{'prompt_id': pid, 'prompt': USER[0]['content'],
           'messages': [dict(USER[0]), {'role': 'assistant', 'content': a}],
           'source': source, 'sample': s, **({'tokenizer': tokenizer} if tokenizer else {})}
          for pid, s, a in answers]


def test_pairs_are_read_by_preference_data_and_independent_of_file_order(imported, tmp_path):
  path, _ = imported
  tok = runs.read_config(path).data.tokenizer
  a = _write(tmp_path / 'a.jsonl', _rows('policy_a', [(0, 0, 'A fox.'), (0, 1, 'fox'), (1, 0, 'x'),
                                                      (2, 0, 'same')], tok))
  b = _write(tmp_path / 'b.jsonl', _rows('policy_b', [(0, 0, 'A quick fox.'), (1, 0, 'y = 1'), (2, 0, 'same'),
                                                      (3, 0, 'only')]))
  summary = judge.judge(path, f'{b},{tmp_path}/a*.jsonl', str(tmp_path / 'one.jsonl'), batch_size=4)
  assert summary.startswith('4 prompts, 2 pairs, skipped prompts: 1 identical answers, 1 single candidate;')
  judge.judge(path, f'{a},{b}', str(tmp_path / 'two.jsonl'), batch_size=4)
  for name in ('.jsonl', '.scores.jsonl'):
    assert (tmp_path / f'one{name}').read_text() == (tmp_path / f'two{name}').read_text()
  scores = [json.loads(l) for l in (tmp_path / 'one.scores.jsonl').read_text().splitlines()]
  assert [(r['prompt_id'], r['source'], r['sample']) for r in scores] == [
      (0, 'policy_a', 0), (0, 'policy_a', 1), (0, 'policy_b', 0), (1, 'policy_a', 0), (1, 'policy_b', 0),
      (2, 'policy_a', 0), (2, 'policy_b', 0), (3, 'policy_b', 0)]
  lines = (tmp_path / 'one.jsonl').read_text().splitlines()
  for i, line in enumerate(lines):
    prompt, chosen, rejected = preference_data.parse_pair(line, f'one.jsonl:{i + 1}')
    pair = json.loads(line)
    assert prompt == USER and chosen != rejected and pair['method'] == 'mean_token_loglik'
    best = max((r for r in scores if r['prompt_id'] == pair['prompt_id']), key=lambda r: r['score'])
    assert pair['score_chosen'] == best['score'] >= pair['score_rejected']
  judge.judge(path, a, str(tmp_path / 'rated.jsonl'), method='rating')
  rated = [json.loads(l) for l in (tmp_path / 'rated.scores.jsonl').read_text().splitlines()]
  assert all(1 <= r['score'] <= 9 and r['method'] == 'rating' for r in rated)


def test_candidates_of_one_prompt_id_must_share_their_prompt(tmp_path):
  other = _rows('p', [(0, 1, 'b')])
  other[0]['messages'][0]['content'] = 'Another question?'
  _write(tmp_path / 'c.jsonl', _rows('p', [(0, 0, 'a')]) + other)
  with pytest.raises(ValueError, match=r'c.jsonl:1 and .*c.jsonl:2: prompt_id 0 with different prompt messages'):
    judge.group(judge.read_candidates(str(tmp_path / 'c.jsonl')))


def _judge(*args):
  return subprocess.run([sys.executable, '-m', 'train.judge', *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=180)


@pytest.mark.parametrize('case', ['bad line', 'tokenizer'])
def test_bad_input_ends_with_one_line_and_exit_2(imported, tmp_path, case):
  path, _ = imported
  rows = [json.dumps(r) for r in _rows('p', [(0, 0, 'a'), (0, 1, 'b')], 'bytes' if case == 'tokenizer' else None)]
  if case == 'bad line':
    rows[1] = rows[1][:-3]
  (tmp_path / 'c.jsonl').write_text('\n'.join(rows) + '\n')
  proc = _judge(f'--workdir={path}', f'--candidates={tmp_path}/c.jsonl', f'--out={tmp_path}/pairs.jsonl')
  want = (f'error: {tmp_path}/c.jsonl:2: not valid JSON' if case == 'bad line' else
          f'error: the judge {path} reads tokenizer {path}/tokenizer.model, but {tmp_path}/c.jsonl:1 was generated '
          'by a policy with tokenizer bytes; use a judge that shares the policy\'s tokenizer')
  assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith(want), proc.stderr
  assert not os.path.exists(tmp_path / 'pairs.jsonl')
