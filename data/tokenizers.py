"""Tokenizers with one interface: `encode(str) -> list[int]`, `decode(list[int]) -> str`,
`encode_with_offsets(str) -> (ids, [(start, end) byte ranges])` (what the chat templates weight by), and the
attributes `vocab_size`, `bos_id`, `eos_id`, `pad_id`. `encode` adds no special tokens.

  get_tokenizer('bytes')            ByteTokenizer: no file. ids 0 = pad, 1 = bos, 2 = eos, and
                                    byte b (of the UTF-8 encoding) -> b + 3; vocab_size 259.
  get_tokenizer('/path/x.model')    SentencePieceTokenizer over a SentencePiece model file, e.g.
                                    Mistral's `tokenizer.model` as-is (unk 0, bos 1, eos 2). Needs the
                                    `sentencepiece` package (imported only here).

`train_sentencepiece` trains a small byte-fallback BPE model on texts (Mistral's id layout: unk 0,
bos 1, eos 2, no pad piece) whose encode/decode round-trips any string, whitespace included.

Packed sequences mark padding by segment_ids == 0, never by the id: `pad_id` is only the filler.
"""
from collections.abc import Iterable, Sequence
import os


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: pad 0, bos 1, eos 2; byte b -> b + 3."""

  NUM_SPECIAL = 3
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 256 + NUM_SPECIAL

  def encode(self, text: str) -> list[int]:
    return [b + self.NUM_SPECIAL for b in text.encode('utf-8')]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each id's [start, end) byte range in the UTF-8 text (one byte each)."""
    ids = self.encode(text)
    return ids, [(i, i + 1) for i in range(len(ids))]

  def decode(self, ids: Sequence[int]) -> str:
    """Drops special and out-of-range ids; invalid UTF-8 becomes U+FFFD."""
    data = bytes(int(i) - self.NUM_SPECIAL for i in ids
                 if self.NUM_SPECIAL <= int(i) < self.vocab_size)
    return data.decode('utf-8', errors='replace')

  def __repr__(self):
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece `.model` file. `pad_id` is the model's pad piece, or 0 where it has none."""

  def __init__(self, path: str):
    self.path = str(path)
    self._load()

  def _load(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top
    # Read through epath so that a model on gs:// (an imported checkpoint's directory) loads too.
    self._sp = spm.SentencePieceProcessor(model_proto=epath.Path(self.path).read_bytes())
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else 0

  # Pickles by path (grain may copy transforms into worker processes).
  def __getstate__(self):
    return {'path': self.path}

  def __setstate__(self, state):
    self.path = state['path']
    self._load()

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each piece's [start, end) byte range in the UTF-8 text (the dummy-prefix piece is empty)."""
    pieces = self._sp.encode(text, return_type='proto').pieces
    return [int(p.id) for p in pieces], [(int(p.begin), int(p.end)) for p in pieces]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __repr__(self):
    return f'SentencePieceTokenizer({self.path!r})'


def get_tokenizer(spec: str):
  """'bytes' -> ByteTokenizer; a path ending in '.model' -> SentencePieceTokenizer."""
  if spec == 'bytes':
    return ByteTokenizer()
  if isinstance(spec, (str, os.PathLike)) and str(spec).endswith('.model'):
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = str(spec) if '://' in str(spec) else os.path.expanduser(str(spec))
    if not epath.Path(path).is_file():
      raise FileNotFoundError(f'SentencePiece model {path!r} does not exist.')
    return SentencePieceTokenizer(path)
  raise ValueError(f"Unknown tokenizer {spec!r}: use 'bytes' or a path to a SentencePiece "
                   f"'.model' file.")


def train_sentencepiece(texts: Iterable[str], model_prefix: str, *, vocab_size: int = 1000,
                        model_type: str = 'bpe') -> str:
  """Trains a SentencePiece model on `texts` (split into lines); returns the `.model` path.

  Identity normalisation, kept whitespace and byte fallback make decode(encode(s)) == s for any s
  (newlines, absent from the line-wise training data, are encoded as byte pieces). The vocabulary
  may come out smaller than `vocab_size` on a tiny corpus (a soft limit). Single-threaded
  so the result depends only on the inputs.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  def lines():
    for text in texts:
      for line in text.splitlines():
        if line.strip():
          yield line

  spm.SentencePieceTrainer.train(
      sentence_iterator=lines(), model_prefix=str(model_prefix), vocab_size=vocab_size,
      model_type=model_type, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0,
      max_sentence_length=16384, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return f'{model_prefix}.model'
