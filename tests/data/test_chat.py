"""Chat data: the templates against Jinja renderings of their published definitions, the loss weights on the
assistant's replies, the `chat` builder (JSONL files and the stdlib instruction set) with its bad lines, and the
'chat' format's packed and padded rows."""
import ast
import json

import jinja2
import numpy as np
import pytest

from data import chat
from data import chat_data
from data import formats
from data import pipeline
from data import tokenizers

# Zephyr's chat template (HuggingFaceH4/zephyr-7b-beta's tokenizer config), and Mistral-Instruct's with the
# system message put before the first user message. Rendered as transformers renders chat templates: Jinja
# with trim_blocks and lstrip_blocks.
ZEPHYR_JINJA = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
MISTRAL_JINJA = """{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}\
{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}\
{% for message in messages %}{% if message['role'] == 'user' %}\
{% if loop.first and system is not none %}{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}\
{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}\
{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"""
JINJA = {'zephyr': ZEPHYR_JINJA, 'mistral': MISTRAL_JINJA}

CONVERSATIONS = [
    [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': 'It is 4.'}],
    [{'role': 'system', 'content': 'Answer in French.'}, {'role': 'user', 'content': 'Bonjour ?'},
     {'role': 'assistant', 'content': 'Bonjour, ça va.'}, {'role': 'user', 'content': 'Et après ?'},
     {'role': 'assistant', 'content': 'Rien → fin 🙂'}],
]


def _jinja(template, messages, add_generation_prompt=False):
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(JINJA[template]).render(messages=messages, eos_token='</s>',
                                                 add_generation_prompt=add_generation_prompt)


def _reference_ids(text, tokenizer):
  """BOS, then each '</s>'-separated piece of the rendered text encoded whole, joined by the EOS id."""
  ids = [tokenizer.bos_id]
  pieces = text.split('</s>')
  for i, piece in enumerate(pieces):
    ids += tokenizer.encode(piece) if piece else []
    if i < len(pieces) - 1:
      ids.append(tokenizer.eos_id)
  return ids


@pytest.fixture(scope='module')
def sentencepiece(tmp_path_factory):
  texts = [json.dumps(c) for c in CONVERSATIONS] * 20 + ['the quick brown fox jumps over the lazy dog'] * 20
  return tokenizers.get_tokenizer(tokenizers.train_sentencepiece(
      texts, tmp_path_factory.mktemp('sp') / 'chat', vocab_size=400))


@pytest.mark.parametrize('template', sorted(JINJA))
def test_templates_equal_their_published_definitions(template, sentencepiece):
  for messages in CONVERSATIONS:
    want = _jinja(template, messages)
    assert chat.render(messages, template) == want
    for tokenizer in (tokenizers.ByteTokenizer(), sentencepiece):
      tokens, _ = chat.encode(messages, tokenizer, template)
      assert tokens.tolist() == _reference_ids(want, tokenizer), (template, tokenizer)
  prompt = CONVERSATIONS[1][:4]
  assert chat.render(prompt, template, add_generation_prompt=True) == _jinja(template, prompt, True)
  if template == 'zephyr':
    assert chat.render(prompt, template, True).endswith('Et après ?</s>\n<|assistant|>\n')


@pytest.mark.parametrize('template', sorted(JINJA))
def test_weights_cover_exactly_the_replies_and_their_eos(template, sentencepiece):
  messages = CONVERSATIONS[1]
  replies = [m['content'] for m in messages if m['role'] == 'assistant']
  byte = tokenizers.ByteTokenizer()
  tokens, weights = chat.encode(messages, byte, template)
  # Byte tokens: the weighted ones are, in order, each reply's bytes then its EOS, and nothing else.
  want = []
  for reply in replies:
    want += byte.encode(reply) + [byte.eos_id]
  assert tokens[weights == 1].tolist() == want
  assert (weights[tokens == byte.eos_id] == 1).sum() == len(replies)  # User and system EOS are not trained.
  tokens, weights = chat.encode(messages, sentencepiece, template)
  trained = [int(t) for t, w in zip(tokens, weights) if w]
  assert sentencepiece.decode([t for t in trained if t != sentencepiece.eos_id]) == ''.join(replies)
  assert trained.count(sentencepiece.eos_id) == len(replies)


def test_bad_conversations_are_one_line_each():
  with pytest.raises(chat.ChatError, match=r'^x.jsonl:3: message 1 has no "role"'):
    chat.parse_line('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', 'x.jsonl:3')
  with pytest.raises(chat.ChatError, match=r"unknown role 'bot'; use one of system, user, assistant"):
    chat.parse_line('{"messages": [{"role": "bot", "content": "a"}]}', 'x.jsonl:1')
  with pytest.raises(chat.ChatError, match='the conversation is empty'):
    chat.parse_line('{"messages": []}', 'x.jsonl:1')
  with pytest.raises(chat.ChatError, match='not valid JSON'):
    chat.parse_line('{"messages": [', 'x.jsonl:1')
  with pytest.raises(ValueError, match="chat template 'chatml' does not exist; use one of mistral, zephyr"):
    chat.render(CONVERSATIONS[0], 'chatml')
  with pytest.raises(chat.ChatError, match="alternating user, assistant"):
    chat.render(CONVERSATIONS[0][::-1], 'mistral')


def _write_jsonl(path, lines):
  path.write_text('\n'.join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + '\n')


def test_jsonl_builder_splits_by_hash_and_names_bad_lines(tmp_path):
  corpus = tmp_path / 'chats'
  corpus.mkdir()
  good = [{'messages': [{'role': 'user', 'content': f'question {i}'},
                        {'role': 'assistant', 'content': f'answer {i}'}]} for i in range(60)]
  _write_jsonl(corpus / 'a.jsonl', good[:30])
  _write_jsonl(corpus / 'b.jsonl', good[30:40] + ['{"messages": [{"role": "robot", "content": "x"}]}'] + good[40:])
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(chat.ChatError) as error:
    pipeline.get_source('chat', 'train', data_dir, builder_config=chat_data.files_config(str(corpus / '*.jsonl')))
  assert str(error.value).startswith(f"{corpus / 'b.jsonl'}:11: message 0 has the unknown role 'robot'")
  assert "data.on_bad_line='skip'" in str(error.value) and '\n' not in str(error.value)

  config = chat_data.files_config(str(corpus / '*.jsonl'), on_bad_line='skip')
  got = {}
  for split in ('train', 'validation', 'test'):
    src = pipeline.get_source('chat', split, data_dir, builder_config=config)
    for i in range(len(src)):
      messages = json.loads(bytes(src[i]['messages']).decode())
      got[messages[0]['content']] = (split, bytes(src[i]['source']).decode())
  assert len(got) == 60
  for i, record in enumerate(good):
    split, source = got[f'question {i}']
    assert split == chat_data.split_of(json.dumps(record['messages'], sort_keys=True))
    assert source == (f'a.jsonl:{i + 1}' if i < 30 else f'b.jsonl:{i - 30 + 1 + (i >= 40)}')


def test_stdlib_instruction_set_is_real_code_and_split_by_function():
  conversations = list(chat_data.stdlib_conversations())
  assert len(conversations) > 1000
  keys = [k for k, _ in conversations]
  assert len(set(keys)) == len(keys)
  by_key = dict(conversations)
  messages = by_key['shlex.quote']
  code = messages[-1]['content']
  assert code.startswith('def quote(s):') and 'Write' in messages[-2]['content']
  compile(code, 'quote', 'exec')  # The reply is the function's real source.
  assert by_key['textwrap.indent'][-1]['content'].startswith('def indent(text, prefix, predicate=None):')
  shares = {s: sum(chat_data.split_of(k) == s for k in keys) / len(keys) for s in ('validation', 'test')}
  assert 0.03 < shares['validation'] < 0.07 and 0.03 < shares['test'] < 0.07


def test_source_segments_equal_the_ast_modules_own():
  """chat_data.source_segment splits the file once; ast.get_source_segment (the reference) on every call."""
  source = ('def f(x):  # \u00e9t\u00e9\r\n  return x\r\n\x0c\nclass C:\r  def g(self): return "\u00fc"\n'
            '  async def h(self):\n    pass')
  tree = ast.parse(source)
  lines = chat_data._LINE.findall(source)
  nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Return))]
  assert len(nodes) == 5
  for node in nodes:
    assert chat_data.source_segment(lines, node) == ast.get_source_segment(source, node)


def _rows_config(tmp_path, corpus, **overrides):
  return {'format': 'chat', 'files': str(corpus / '*.jsonl'), 'data_dir': str(tmp_path / 'tfds'), 'seq_len': 96,
          'num_threads': 1, 'prefetch': 1, 'shuffle': False, 'packing_bins': 4, **overrides}


@pytest.fixture
def small_corpus(tmp_path):
  corpus = tmp_path / 'small'
  corpus.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(200):
    turns = [{'role': 'user', 'content': 'q' * int(rng.integers(1, 8))},
             {'role': 'assistant', 'content': 'a' * int(rng.integers(1, 8))}]
    if i % 3 == 0:
      turns = [{'role': 'system', 'content': 's' * 3}] + turns
    if i % 5 == 0:  # Longer than a row: cut to its first 96 tokens.
      turns.append({'role': 'user', 'content': 'Q' * 40})
      turns.append({'role': 'assistant', 'content': f'{i:03d}' + 'A' * 60})
    lines.append({'messages': turns})
  _write_jsonl(corpus / 'c.jsonl', lines)
  return corpus


@pytest.mark.parametrize('packing', ['first_fit', 'none'])
def test_rows_train_on_reply_tokens_only_never_across_conversations(packing, tmp_path, small_corpus):
  config = _rows_config(tmp_path, small_corpus, packing=packing)
  it = pipeline.make_train_iter(config, global_batch_size=4, seed=0)
  reply_bytes = {ord(c) + tokenizers.ByteTokenizer.NUM_SPECIAL for c in 'aA0123456789'}
  segments_per_row = []
  for _ in range(10):
    batch = next(it)
    assert set(batch) == {'tokens', 'segment_ids', 'positions', 'targets', 'loss_mask'}
    for row in range(4):
      seg, pos, mask = batch['segment_ids'][row], batch['positions'][row], batch['loss_mask'][row]
      targets = batch['targets'][row]
      assert set(targets[mask == 1].tolist()) <= reply_bytes | {2}  # Reply bytes and EOS only.
      for s in set(seg[seg > 0].tolist()):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all() and pos[where].tolist() == list(range(len(where)))
        # The last token of a conversation predicts nothing: no loss crosses into the next one.
        assert mask[where[-1]] == 0
      assert not mask[seg == 0].any()
      segments_per_row.append(len(set(seg[seg > 0].tolist())))
  assert max(segments_per_row) > 1 if packing == 'first_fit' else set(segments_per_row) == {1}


def test_train_iterator_resumes_exactly_and_eval_counts_every_token(tmp_path, small_corpus):
  config = _rows_config(tmp_path, small_corpus, shuffle=True)
  it = pipeline.make_train_iter(config, global_batch_size=4, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  again = pipeline.make_train_iter(config, global_batch_size=4, seed=3)
  again.set_state(state)
  for a in want:
    b = next(again)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  fmt = formats.get_format(config)
  src = fmt._source(config, 'eval_split')
  encode = fmt._encode(config)
  tokens = sum(len(encode(src[i])['tokens']) for i in range(len(src)))
  for processes in (1, 2):
    seen = 0
    for p in range(processes):
      batches, count = pipeline.make_eval_iter(config, global_batch_size=4, process_index=p,
                                               process_count=processes)
      assert count == tokens
      seen += sum(int((b['segment_ids'] > 0).sum()) for b in batches())
    assert seen == tokens


def test_unknown_template_or_packing_is_one_line(tmp_path, small_corpus):
  with pytest.raises(ValueError, match="chat template 'llama' does not exist"):
    pipeline.make_train_iter(_rows_config(tmp_path, small_corpus, template='llama'), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="data.packing='greedy' is unknown"):
    pipeline.make_train_iter(_rows_config(tmp_path, small_corpus, packing='greedy'), global_batch_size=4, seed=0)


def test_a_split_sum_reads_past_a_split_the_data_leaves_empty(tmp_path):
  """Our builders store no empty split; in a sum such as 'validation+test' it adds nothing (a small file of
  teacher answers in a pipeline), while the empty split alone is still an error naming the splits present."""
  import json as json_lib
  from data import chat_data, sources
  rows, splits = [], []
  for i in range(400):
    messages = [{'role': 'user', 'content': f'question {i}'}, {'role': 'assistant', 'content': f'answer {i}'}]
    split = chat_data.split_of(json_lib.dumps(messages, sort_keys=True))  # the builder's key
    if split == 'validation':
      continue
    rows.append(messages)
    splits.append(split)
    if len(rows) == 40 and 'test' in splits:
      break
  (tmp_path / 'c.jsonl').write_text(''.join(json_lib.dumps({'messages': m}) + '\n' for m in rows))
  config = chat_data.files_config(str(tmp_path / 'c.jsonl'))
  src = sources.get_source('chat', 'validation+test', str(tmp_path / 'tfds'), builder_config=config)
  assert len(src) == splits.count('test') > 0
  with pytest.raises(ValueError, match="Unknown split 'validation' of TFDS dataset 'chat'; available splits: test, train"):
    sources.get_source('chat', 'validation', str(tmp_path / 'tfds'), builder_config=config)
