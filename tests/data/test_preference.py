"""Preference pairs: the JSONL builder (both common shapes, bad lines named, identical answers counted and
skipped) and the 'preference' format (each pair's rows side by side, each answer scored whole and on its own,
prompts cut from the left, answers cut at max_length, pairs without room skipped and counted)."""
import json

import ml_collections
import numpy as np
import pytest

from data import chat
from data import pipeline
from data import preference_data
from data import tokenizers

PROMPT = [{'role': 'user', 'content': 'Name a prime.'}]


def _ultrafeedback(i, chosen, rejected):
  """The UltraFeedback-binarized shape: each answer inside the whole conversation."""
  prompt = f'Name prime number {i}.'
  user = {'role': 'user', 'content': prompt}
  return {'prompt': prompt, 'chosen': [user, {'role': 'assistant', 'content': chosen}],
          'rejected': [user, {'role': 'assistant', 'content': rejected}]}


def _write(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))


@pytest.fixture
def corpus(tmp_path):
  root = tmp_path / 'pairs'
  root.mkdir()
  good = [_ultrafeedback(i, f'{2 * i + 3} is prime.', 'I like turtles, and many other animals too.')
          for i in range(40)]
  # TRL's shapes: the prompt apart, answers as the assistant's turns or as plain strings.
  good += [{'prompt': [{'role': 'user', 'content': f'Count to {i}.'}], 'chosen': [{'role': 'assistant',
                                                                                  'content': ' '.join(map(str, range(i)))}],
            'rejected': 'No.'} for i in range(2, 22)]
  _write(root / 'a.jsonl', good[:30])
  _write(root / 'b.jsonl', good[30:] + [_ultrafeedback(99, 'Same.', 'Same.')])
  return root


def test_builder_reads_both_shapes_and_skips_identical_answers(corpus, tmp_path, caplog):
  config = preference_data.files_config(str(corpus / '*.jsonl'))
  data_dir = str(tmp_path / 'tfds')
  pairs = {}
  for split in ('train', 'validation', 'test'):
    src = pipeline.get_source('preference', split, data_dir, builder_config=config)
    for i in range(len(src)):
      ex = src[i]
      pairs[bytes(ex['source']).decode()] = [json.loads(bytes(ex[f]).decode()) for f in ('prompt', 'chosen', 'rejected')]
  assert len(pairs) == 60 and 'b.jsonl:31' not in pairs  # the identical pair, skipped
  assert '1 skipped: chosen equals rejected' in caplog.text and '61 read' in caplog.text
  prompt, chosen, rejected = pairs['a.jsonl:1']
  assert prompt == [{'role': 'user', 'content': 'Name prime number 0.'}]
  assert chosen == [{'role': 'assistant', 'content': '3 is prime.'}] and rejected[0]['role'] == 'assistant'
  assert pairs['b.jsonl:11'][2] == [{'role': 'assistant', 'content': 'No.'}]


@pytest.mark.parametrize('line, message', [
    ({'prompt': 'x', 'chosen': 'y'}, 'the pair has no "rejected" field'),
    ({'chosen': 'a', 'rejected': 'b'}, 'the pair has no "prompt" field'),
    ({'prompt': 'x', 'chosen': [{'role': 'robot', 'content': 'a'}], 'rejected': 'b'}, "unknown role 'robot'"),
    (_ultrafeedback(1, 'a', 'b') | {'rejected': [{'role': 'user', 'content': 'other'},
                                                 {'role': 'assistant', 'content': 'b'}]}, 'continue different'),
])
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, line, message):
  root = tmp_path / 'bad'
  root.mkdir()
  _write(root / 'p.jsonl', [_ultrafeedback(0, 'a', 'b'), line])
  with pytest.raises(chat.ChatError, match=rf"p\.jsonl:2: .*{message}.*data\.on_bad_line='skip'"):
    pipeline.get_source('preference', 'train', str(tmp_path / 'tfds'),
                        builder_config=preference_data.files_config(str(root / '*.jsonl')))
  skipped = preference_data.files_config(str(root / '*.jsonl'), on_bad_line='skip')
  assert len(pipeline.get_source('preference', 'train', str(tmp_path / 'tfds'), builder_config=skipped)) == 1


def _data(corpus, tmp_path, **fields):
  return ml_collections.ConfigDict(dict(format='preference', files=str(corpus / '*.jsonl'),
                                        data_dir=str(tmp_path / 'tfds'), template='zephyr', tokenizer='bytes',
                                        num_threads=1, prefetch=1, shuffle=False, **fields))


def _text(tokens):
  return tokenizers.get_tokenizer('bytes').decode([int(t) for t in tokens if t > 3])


def test_rows_side_by_side_each_answer_scored_whole(corpus, tmp_path, capsys):
  config = _data(corpus, tmp_path, max_length=96)
  batch = next(pipeline.make_train_iter(config, global_batch_size=4, seed=0))
  assert batch['tokens'].shape == (4, 2, 96) and batch['loss_mask'].shape == (4, 2, 96)
  assert 'preference data train: ' in capsys.readouterr().out
  for pair in range(4):
    texts = []
    for side in (0, 1):
      mask = batch['loss_mask'][pair, side] > 0
      scored = batch['targets'][pair, side][mask]
      texts.append(_text(scored))
      assert scored[-1] == tokenizers.get_tokenizer('bytes').eos_id  # the answer's EOS is scored
      # The scored targets are exactly the answer: what follows '<|assistant|>\n' in the row.
      row = _text(batch['tokens'][pair, side][batch['segment_ids'][pair, side] > 0])
      assert row.split('<|assistant|>\n')[-1].startswith(texts[-1][:-1] if texts[-1] else '')
    assert texts[0] != texts[1]
    lengths = (batch['loss_mask'][pair] > 0).sum(-1)
    assert lengths[0] != lengths[1]  # neither answer cut to the other's length


def test_truncation_cuts_the_prompt_from_the_left_and_the_answer_at_the_end(corpus, tmp_path, capsys):
  tokenizer = tokenizers.get_tokenizer('bytes')
  config = _data(corpus, tmp_path, max_length=40, max_prompt_length=12)
  batches, count = pipeline.make_eval_iter(config, global_batch_size=4)
  out = capsys.readouterr().out
  assert f'preference data validation: {count} pairs (' in out and 'truncated' in out
  for batch in batches():
    for pair in range(4):
      for side in (0, 1):
        seg = batch['segment_ids'][pair, side]
        if not batch['mask'][pair]:
          assert not seg.any()
          continue
        mask = batch['loss_mask'][pair, side]
        first = int(np.argmax(mask > 0))  # the last prompt position: it predicts the answer's first token
        # Every prompt here is longer than 12 tokens: its last 12 are kept (the BOS and the question go).
        assert _text(batch['tokens'][pair, side][:first + 1]) == 'assistant|>\n' and first + 1 == 12
        assert seg.sum() <= 40 and mask.sum() == seg.sum() - 12 - (seg.sum() < 40)
  # No room for any answer: every pair skipped, which is one line saying so.
  tight = _data(corpus, tmp_path, max_length=8)
  with pytest.raises(ValueError, match=r"no pair of split 'validation' fits data.max_length=8"):
    pipeline.make_eval_iter(tight, global_batch_size=4)
  assert tokenizer.eos_id > 0
