"""Byte and SentencePiece tokenizers: ids, round trips, `get_tokenizer`."""
import pickle
import sysconfig
import os

import pytest

from data import tokenizers

SAMPLES = ['', 'hello', 'def f(x):\n    return  x\t+ 1  \n\n', 'héllo wörld → 🙂 中文 \x00 end']


def test_byte_tokenizer_ids():
  tok = tokenizers.get_tokenizer('bytes')
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode('A') == [ord('A') + 3]
  assert tok.encode('é') == [0xC3 + 3, 0xA9 + 3]
  assert tok.encode('\x00') == [3] and tok.encode('\xff') == [0xC3 + 3, 0xBF + 3]


@pytest.mark.parametrize('s', SAMPLES)
def test_byte_tokenizer_round_trip(s):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(s)
  assert all(3 <= i < 259 for i in ids)
  assert tok.decode(ids) == s
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == s


def test_unknown_spec_raises_one_line_value_error(tmp_path):
  for spec in ('byte', 'gpt2', str(tmp_path / 'x.json')):
    with pytest.raises(ValueError) as e:
      tokenizers.get_tokenizer(spec)
    assert '\n' not in str(e.value) and repr(spec) in str(e.value)
  with pytest.raises(FileNotFoundError):
    tokenizers.get_tokenizer(str(tmp_path / 'missing.model'))


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  root = sysconfig.get_paths()['stdlib']
  texts = [open(os.path.join(root, f), encoding='utf-8').read()[:3000]
           for f in ('argparse.py', 'textwrap.py', 'string.py')]
  return tokenizers.train_sentencepiece(texts, str(tmp_path_factory.mktemp('spm') / 'tiny'),
                                        vocab_size=500)


def test_sentencepiece_model_ids_and_round_trip(sp_model):
  tok = tokenizers.get_tokenizer(sp_model)
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 0, 500)
  for s in SAMPLES:
    ids = tok.encode(s)
    assert all(0 <= i < 500 for i in ids) and tok.bos_id not in ids
    assert tok.decode(ids) == s
  assert len(tok.encode('    return self')) < len('    return self')  # Learned merges.
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])
