"""Format 'chat': conversations -> chat template -> rows trained on the assistant's replies only.

Config fields and defaults (besides data_dir, shuffle, num_threads, prefetch: `COMMON_DEFAULTS`):
  name              'chat/stdlib'   a TFDS dataset with a `messages` feature (JSON), see `chat_data`
  files             None            a glob or directory of chat JSONL files: overrides `name`
  on_bad_line       'error'         for `files`: a line that is not valid chat stops the build ('error')
                                    or is skipped with a warning ('skip'); either way it is named by file:line
  template          'zephyr'        the chat template (`chat.TEMPLATES`: 'zephyr', 'mistral')
  tokenizer         'bytes'         or a path to a SentencePiece `.model`
  seq_len           required        tokens per row; a longer conversation is cut to its first seq_len tokens
  packing           'first_fit'     whole conversations packed into rows (grain's first-fit packer over
                                    `packing_bins` open rows; a conversation never spans two rows) or 'none':
                                    one conversation per row, padded
  packing_bins      16
  train_split       'train'         eval_split  'validation'
  num_train_examples None           rows in one epoch, to skip counting them

Batches have the features of 'packed_text' (`packing.FEATURES`, int32 [B, seq_len]): tokens, segment_ids
(1, 2, ... per conversation in a row, 0 for padding), positions (restarting at 0 per conversation), targets
(the next token of the same conversation, else 0) and loss_mask: the weight of the token each position
predicts, so 1 exactly where the target is a token of an assistant reply or the EOS that ends it, 0 on
system and user turns, template markup, across conversations and on padding. The language-model objective
weighs its loss by loss_mask: SFT on the replies, and its eval loss and perplexity on the replies only.
"""
from collections.abc import Callable, Iterator
import json

import grain
import grain.experimental
import numpy as np

from .. import chat
from .. import chat_data
from .. import packing
from .. import tokenizers
from ..sources import get_source
from . import base


def _seq_len(config) -> int:
  seq_len = config.get('seq_len', None)
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f'data.seq_len must be an int >= 2, got {seq_len!r}.')
  return int(seq_len)


class Encode:
  """{'messages': JSON} -> {'tokens', 'weights'} int32 [<= seq_len] through the chat template."""

  def __init__(self, tokenizer, template: str, seq_len: int):
    self.tokenizer, self.template, self.seq_len = tokenizer, template, seq_len

  def __call__(self, example):
    messages = example['messages']
    if isinstance(messages, (bytes, np.bytes_)):
      messages = bytes(messages).decode('utf-8')
    tokens, weights = chat.encode(json.loads(messages), self.tokenizer, self.template)
    return {'tokens': tokens[:self.seq_len], 'weights': weights[:self.seq_len]}


def row_features(tokens, weights, segment_ids, positions, pad_id: int = 0) -> dict:
  """`packing.FEATURES` of one row: targets within a segment, loss_mask the weight of the target token."""
  tokens, weights = np.asarray(tokens, np.int32), np.asarray(weights, np.int32)
  seg, pos = np.asarray(segment_ids, np.int32), np.asarray(positions, np.int32)
  same = np.zeros_like(seg)
  same[:-1] = (seg[:-1] > 0) & (seg[1:] == seg[:-1])
  targets = np.zeros_like(tokens)
  targets[:-1] = np.where(same[:-1] > 0, tokens[1:], 0)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:-1] = same[:-1] * weights[1:]
  return {'tokens': np.where(seg > 0, tokens, pad_id).astype(np.int32), 'segment_ids': seg, 'positions': pos,
          'targets': targets, 'loss_mask': loss_mask}


class _FromPacked:
  def __init__(self, pad_id):
    self.pad_id = pad_id

  def __call__(self, row):
    return row_features(row['tokens'], row['weights'], row['tokens_segment_ids'], row['tokens_positions'],
                        self.pad_id)


class _Padded:
  def __init__(self, seq_len, pad_id):
    self.seq_len, self.pad_id = seq_len, pad_id

  def __call__(self, ex):
    n = len(ex['tokens'])
    tokens = np.full(self.seq_len, self.pad_id, np.int32)
    weights = np.zeros(self.seq_len, np.int32)
    tokens[:n], weights[:n] = ex['tokens'], ex['weights']
    seg = (np.arange(self.seq_len) < n).astype(np.int32)
    return row_features(tokens, weights, seg, np.where(seg > 0, np.arange(self.seq_len), 0), self.pad_id)


class Chat(base.DataFormat):
  """Chat conversations for supervised finetuning; see the module docstring."""
  name = 'chat'
  defaults = {**base.COMMON_DEFAULTS, 'name': 'chat/stdlib', 'files': None, 'on_bad_line': 'error',
              'template': 'zephyr', 'tokenizer': 'bytes', 'packing': 'first_fit', 'packing_bins': 16,
              'train_split': 'train', 'eval_split': 'validation'}

  def _source(self, config, split_key):
    files = self.cfg(config, 'files')
    name = 'chat' if files else self.cfg(config, 'name')
    builder_config = chat_data.files_config(files, self.cfg(config, 'on_bad_line')) if files else None
    return get_source(name, self.cfg(config, split_key), self.cfg(config, 'data_dir'),
                      builder_config=builder_config)

  def _encode(self, config) -> Encode:
    template = self.cfg(config, 'template')
    chat.get_template(template)  # An unknown name fails here, before any data is read.
    return Encode(tokenizers.get_tokenizer(self.cfg(config, 'tokenizer')), template, _seq_len(config))

  def _rows(self, config, docs: grain.IterDataset, encode: Encode) -> grain.IterDataset:
    seq_len, pad_id = encode.seq_len, encode.tokenizer.pad_id
    mode = self.cfg(config, 'packing')
    if mode == 'none':
      return docs.map(_Padded(seq_len, pad_id))
    if mode != 'first_fit':
      raise ValueError(f"data.packing={mode!r} is unknown; use 'first_fit' or 'none'.")
    packed = grain.experimental.FirstFitPackIterDataset(
        docs, length_struct={'tokens': seq_len, 'weights': seq_len},
        num_packing_bins=int(self.cfg(config, 'packing_bins')), shuffle_bins=False)
    return packed.map(_FromPacked(pad_id))

  def train_iter(self, config, *, global_batch_size, seed, process_index, process_count):
    """This process's contiguous slice of the conversations, reshuffled every epoch from (seed, process_index)
    unless shuffle=False, encoded, packed (or padded) and batched; resumes exactly from its state."""
    batch_size = base.local_batch_size(global_batch_size, process_count)
    encode = self._encode(config)
    src = self._source(config, 'train_split')
    lo, hi = base.process_bounds(len(src), process_index, process_count)
    if hi == lo:
      raise ValueError(f'Process {process_index} of {process_count} gets no training conversations.')
    ds = grain.MapDataset.source(src)[lo:hi]
    if self.cfg(config, 'shuffle'):
      ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0]))
    docs = ds.repeat().map(encode).to_iter_dataset(self.read_options(config))
    return iter(self._rows(config, docs, encode).batch(batch_size, drop_remainder=True))

  def _eval_rows(self, config, src, encode, lo, hi) -> list[dict]:
    docs = grain.MapDataset.source(src)[lo:hi].map(encode).to_iter_dataset(self.read_options(config))
    return list(self._rows(config, docs, encode))

  def eval_iter(self, config, *, global_batch_size, process_index,
                process_count) -> tuple[Callable[[], Iterator[dict]], int]:
    """Process p packs its slice of the eval split into rows, padded with all-padding rows to the batch count
    of the process with the most; every token of every (cut) conversation appears once with segment_ids > 0,
    and the count is the number of those tokens."""
    batch_size = base.local_batch_size(global_batch_size, process_count)
    encode = self._encode(config)
    src = self._source(config, 'eval_split')
    if len(src) == 0:
      raise ValueError(f'Eval split {self.cfg(config, "eval_split")!r} is empty.')
    all_rows = [self._eval_rows(config, src, encode, *base.process_bounds(len(src), p, process_count))
                for p in range(process_count)]
    num_batches = max(1, -(-max(len(r) for r in all_rows) // batch_size))
    rows = all_rows[process_index]
    count = sum(int((r['segment_ids'] > 0).sum()) for rs in all_rows for r in rs)
    padding = packing.padding_row(encode.seq_len, encode.tokenizer.pad_id)

    def batches():
      for b in range(num_batches):
        out = [rows[i] if i < len(rows) else padding for i in range(b * batch_size, (b + 1) * batch_size)]
        yield {k: np.stack([r[k] for r in out]) for k in packing.FEATURES}

    return batches, count

  def num_train_examples(self, config) -> int:
    """The config's `num_train_examples`, else the rows one pass over the train split makes."""
    given = config.get('num_train_examples')
    if given:
      return int(given)
    encode = self._encode(config)
    src = self._source(config, 'train_split')
    return len(self._eval_rows(config, src, encode, 0, len(src)))
