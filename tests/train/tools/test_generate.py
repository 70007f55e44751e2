"""train.generate: chat-shaped rows, greedy replies equal to models.mistral.generate on each prompt alone, samples
that batching and a kill-and-rerun do not change (the same file bytes), and bad input ending with one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import chat, tokenizers
from models import mistral
from train import loop
from train.tools import generate, loader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PROMPTS = [
    {'prompt': 'hi'},
    {'prompt_id': 'conv', 'messages': [{'role': 'system', 'content': 'Be brief.'},
                                       {'role': 'user', 'content': 'What is a fox?'},
                                       {'role': 'assistant', 'content': 'An animal.'}]},
    {'prompt': 'the quick brown fox jumps over the lazy dog'},  # 69 tokens: its reply is cut at 76
    {'prompt': 'x' * 60},                                        # 86 tokens: skipped at max_length 76
    {'prompt_id': 7, 'prompt': 'and the dog?'},
    {'prompt': 'hi'},                                            # a repeat: skipped
]
_RUN = {}


@pytest.fixture
def workdir(tiny_mistral_config):
  """A 1-step run of the tiny Mistral (byte tokens, no chat template: zephyr), trained once per process."""
  if 'path' not in _RUN:
    c = tiny_mistral_config
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1, 0, 1
    c.schedule.warmup_steps, c.eval_at_start = 0, False
    _RUN['path'] = os.path.join(c.data.data_dir, '..', 'lm')
    loop.train(c, _RUN['path'])
  return _RUN['path']


def _prompts(path, records=PROMPTS):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def _rows(path):
  return [json.loads(line) for line in open(path, encoding='utf-8')]


def test_rows_and_greedy_replies_equal_generate_alone(workdir, tmp_path):
  out = str(tmp_path / 'out' / 'greedy.jsonl')
  job = generate.prepare(workdir, _prompts(tmp_path / 'p.jsonl'), out, num_samples=2, max_new_tokens=12,
                         temperature=0, batch_size=3, max_length=76)
  summary = generate.write(job)
  assert summary.startswith(f'generate: 6 prompts (2 skipped: 1 of 76+ tokens (--max_length), 1 repeating a '
                            f'prompt_id); 8 rows written to {out} (0 already there); ')
  rows = _rows(out)
  # Batches of 3 rows, shortest prompts first ('hi' 28 tokens, 'and the dog?' 38, 'conv' 62, the fox 69), each
  # batch in the file's order.
  assert [(r['prompt_id'], r['sample']) for r in rows] == [
      (rows[0]['prompt_id'], 0), (rows[0]['prompt_id'], 1), (7, 0), ('conv', 0), ('conv', 1), (7, 1),
      (rows[6]['prompt_id'], 0), (rows[6]['prompt_id'], 1)]
  assert rows[0]['prompt_id'] == generate.prompt_hash([{'role': 'user', 'content': 'hi'}])
  assert rows[3]['prompt'] == 'What is a fox?' and [m['role'] for m in rows[3]['messages']] == [
      'system', 'user', 'assistant']
  assert set(rows[0]) == {'prompt_id', 'prompt', 'messages', 'sample', 'source', 'temperature', 'top_p', 'top_k',
                          'seed', 'step', 'max_new_tokens', 'tokenizer', 'finished', 'num_tokens'}
  assert {(r['source'], r['step'], r['tokenizer'], r['temperature']) for r in rows} == {('lm', 1, 'bytes', 0)}
  assert chat.validate(rows[0]['messages'])  # chat JSONL: a chat dataset reads it

  run, tok = loader.load_run(workdir), tokenizers.get_tokenizer('bytes')
  for r in rows:
    tokens, _ = chat.encode(r['messages'][:-1], tok, 'zephyr', add_generation_prompt=True)
    budget = min(12, 76 - len(tokens))
    alone = [int(t) for t in np.asarray(mistral.generate(run.model, run.params, tokens[None], 12))[0, len(tokens):]]
    alone = alone[:budget]
    finished = tok.eos_id in alone
    alone = alone[:alone.index(tok.eos_id) + 1] if finished else alone
    assert (r['num_tokens'], r['finished']) == (len(alone), finished)
    assert r['messages'][-1] == {'role': 'assistant', 'content': tok.decode(alone[:-1] if finished else alone)}
  assert rows[6]['num_tokens'] == 7  # the fox's reply, cut at max_length


def test_samples_ignore_batching_and_a_killed_rerun_writes_the_same_bytes(workdir, tmp_path):
  prompts = _prompts(tmp_path / 'p.jsonl')
  options = dict(num_samples=3, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3, max_length=76)
  straight = str(tmp_path / 'straight.jsonl')
  generate.write(generate.prepare(workdir, prompts, straight, batch_size=4, **options))
  want = open(straight, 'rb').read()
  rows = _rows(straight)
  assert len(rows) == 12 and len({r['messages'][-1]['content'] for r in rows}) > 6  # samples differ

  # Without 'hi', every batch has other rows in it (and other padding), and the samples stay the same.
  other = str(tmp_path / 'other.jsonl')
  generate.write(generate.prepare(workdir, _prompts(tmp_path / 'q.jsonl', PROMPTS[1:5]), other, batch_size=4,
                                  **options))
  assert len(_rows(other)) == 9
  assert all(r in rows for r in _rows(other))

  # Killed in the middle of its third batch's write: two of its rows complete, the third cut short.
  killed = tmp_path / 'killed.jsonl'
  lines = want.splitlines(keepends=True)
  killed.write_bytes(b''.join(lines[:10]) + lines[10][:25])
  summary = generate.write(generate.prepare(workdir, prompts, str(killed), batch_size=4, **options))
  assert killed.read_bytes() == want
  assert '2 rows written' in summary and '(10 already there)' in summary
  summary = generate.write(generate.prepare(workdir, prompts, str(killed), batch_size=4, **options))
  assert killed.read_bytes() == want and '0 rows written' in summary

  with pytest.raises(ValueError, match=r'killed.jsonl:1 was written with temperature=0.9, not 0.5; pass another'):
    generate.prepare(workdir, prompts, str(killed), batch_size=4, **{**options, 'temperature': 0.5})


@pytest.mark.parametrize('line, message', [
    ('{"prompt": "hi"', 'not valid JSON'),
    ('["hi"]', 'expected an object with "prompt" (a user message) or "messages"'),
    ('{"prompt": 3}', '"prompt" must be a string, got int.'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}', 'unknown role'),
    ('{"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     'must end with a user message'),
    ('{"prompt": "x", "prompt_id": [1]}', '"prompt_id" must be a string or an integer'),
    ('{"prompt": "x", "prompt_id": "a"}', 'prompt_id \'a\' was given to another prompt at {path}:1'),
])
def test_a_bad_prompt_line_is_named(tmp_path, line, message):
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": "first", "prompt_id": "a"}\n\n' + line + '\n')
  with pytest.raises(ValueError) as e:
    generate.read_prompts(str(path))
  assert str(e.value).startswith(f'{path}:3: ') and message.format(path=path) in str(e.value), str(e.value)


def _generate(*args):
  return subprocess.run([sys.executable, '-m', 'train.generate', *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=180)


def test_the_command_writes_what_the_functions_write(workdir, tmp_path):
  prompts = _prompts(tmp_path / 'p.jsonl', PROMPTS[:2])
  out = tmp_path / 'cli.jsonl'
  proc = _generate(f'--workdir={workdir}', f'--prompts={prompts}', f'--out={out}', '--num_samples=2',
                   '--max_new_tokens=6', '--source=tiny', '--max_length=64')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f'generate: 2 prompts; 4 rows written to {out} (0 already there); ')
  want = tmp_path / 'want.jsonl'
  generate.write(generate.prepare(workdir, prompts, str(want), num_samples=2, max_new_tokens=6, source='tiny',
                                  max_length=64))
  assert out.read_bytes() == want.read_bytes()
  assert {r['top_p'] for r in _rows(out)} == {0.95}  # the defaults: temperature 0.7 within the 0.95 nucleus


def test_bad_input_ends_with_one_line(tmp_path):
  not_lm = tmp_path / 'vit'
  not_lm.mkdir()
  (not_lm / 'config.json').write_text(json.dumps({'model_name': 'vit', 'model': {}}))
  prompts = _prompts(tmp_path / 'p.jsonl', PROMPTS[:1])
  cases = [
      (['--workdir=w', f'--prompts={prompts}', '--num_samples=0'],
       'error: --num_samples=0: ask for at least 1 sample per prompt.'),
      ([f'--workdir={not_lm}', f'--prompts={prompts}'],
       f"error: {not_lm} holds a 'vit' model, which does not generate text; point --workdir at a language "
       "model's workdir (e.g. one of configs/mistral_tiny.py)."),
  ]
  for args, line in cases:
    proc = _generate(*args, f'--out={tmp_path / "o.jsonl"}')
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [line]), proc.stderr


def test_missing_prompts_file(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'--prompts=\S+nope.jsonl does not exist'):
    generate.prepare(workdir, str(tmp_path / 'nope.jsonl'), str(tmp_path / 'o.jsonl'))
