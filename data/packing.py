"""Packs tokenized documents into fixed-length rows (grain's concat-then-split packing).

Each document becomes [bos] + encode(text) + [eos]; documents are concatenated in stream order and
cut into rows of exactly `seq_len` tokens (a document may continue on the next row). Row features,
all int32 [seq_len]:
  tokens       token ids; the tokenizer's pad_id where padding
  segment_ids  1, 2, ... per document piece within the row, 0 for padding (only the last row of a
               finite stream, or eval padding rows, has padding)
  positions    position within the segment, restarting at 0 for every segment (also for the
               continuation of a document split across rows); 0 for padding
  targets      the next token within the same segment: targets[i] = tokens[i + 1] where
               segment_ids[i + 1] == segment_ids[i] > 0, else 0
  loss_mask    1 where targets[i] is such a next token, else 0: so the last token of each
               segment (an eos, or the last token before a row cut) and padding are excluded
The task can therefore use (tokens, targets, loss_mask) directly, with attention restricted to
equal segment_ids (causal within a segment) and `positions` for the position encoding.

The packer (grain.experimental.ConcatThenSplitIterDataset) keeps the document order and its
iterator state holds the parent's state plus the split document's remainder, so it resumes exactly.
"""
import grain
import grain.experimental
import numpy as np

FEATURES = ('tokens', 'segment_ids', 'positions', 'targets', 'loss_mask')


class Tokenize:
  """Maps an example with `text` (str or bytes) to {'tokens': int32 [bos, ..., eos]}."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, example):
    text = example['text']
    if isinstance(text, (bytes, np.bytes_)):
      text = bytes(text).decode('utf-8', errors='replace')
    tok = self.tokenizer
    return {'tokens': np.asarray([tok.bos_id, *tok.encode(str(text)), tok.eos_id], np.int32)}


def add_targets(row: dict) -> dict:
  """Renames the packer's outputs and adds `targets`/`loss_mask` (see the module docstring)."""
  tokens = np.asarray(row['tokens'], np.int32)
  seg = np.asarray(row['tokens_segment_ids'], np.int32)
  pos = np.asarray(row['tokens_positions'], np.int32)
  mask = np.zeros_like(seg)
  mask[:-1] = (seg[:-1] > 0) & (seg[1:] == seg[:-1])
  targets = np.zeros_like(tokens)
  targets[:-1] = np.where(mask[:-1] > 0, tokens[1:], 0)
  return {'tokens': tokens, 'segment_ids': seg, 'positions': pos, 'targets': targets,
          'loss_mask': mask}


class _Pad:
  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def __call__(self, row):
    if self.pad_id:
      row = dict(row, tokens=np.where(row['segment_ids'] > 0, row['tokens'], self.pad_id)
                 .astype(np.int32))
    return row


def pack(docs: grain.IterDataset, seq_len: int, pad_id: int = 0) -> grain.IterDataset:
  """Rows of `seq_len` from a stream of {'tokens': int32 [n]} documents (order preserved)."""
  if seq_len <= 1:
    raise ValueError(f'seq_len={seq_len} must be at least 2.')
  rows = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={'tokens': seq_len})
  return rows.map(add_targets).map(_Pad(pad_id))


def num_rows(doc_lengths, seq_len: int) -> int:
  """Rows that `pack` makes from documents of these token lengths (concat-then-split)."""
  return -(-int(np.sum(doc_lengths, dtype=np.int64)) // seq_len)


def padding_row(seq_len: int, pad_id: int = 0) -> dict:
  """An all-padding row (segment 0, no loss)."""
  zeros = np.zeros(seq_len, np.int32)
  return {'tokens': np.full(seq_len, pad_id, np.int32), 'segment_ids': zeros,
          'positions': zeros, 'targets': zeros, 'loss_mask': zeros}


def stage_length(stages, step: int) -> int:
  """The row length at `step` of a GrowLength schedule ((start_step, seq_len), ...), sorted, from step 0."""
  length = stages[0][1]
  for start, seq_len in stages:
    if step < start:
      break
    length = seq_len
  return length


def check_stages(stages) -> tuple[tuple[int, int], ...]:
  """The schedule as int pairs; ValueError (one line) unless it starts at step 0, its steps increase and every
  length is an int >= 2."""
  try:
    pairs = tuple((int(start), int(seq_len)) for start, seq_len in stages)
  except (TypeError, ValueError):
    raise ValueError(f'grow_length={stages!r} is not a sequence of (start_step, seq_len) pairs; e.g. '
                     '((0, 128), (1000, 512)).') from None
  if not pairs or pairs[0][0] != 0:
    raise ValueError(f'grow_length={stages!r} must start at step 0, e.g. ((0, 128), (1000, 512)).')
  if any(b[0] <= a[0] for a, b in zip(pairs, pairs[1:])) or any(n < 2 for _, n in pairs):
    raise ValueError(f'grow_length={stages!r}: the start steps must increase and every seq_len be >= 2.')
  return pairs


class _GrowingRowsIterator(grain.DatasetIterator):
  """Concatenates documents and cuts rows whose length depends on the row's index (see `pack_growing`)."""

  def __init__(self, parent: grain.DatasetIterator, length_of_row):
    super().__init__(parent)
    self._length_of_row = length_of_row
    self._row = 0
    self._rest = np.zeros(0, np.int32)  # the tokens of the current document not yet in a row

  def __next__(self):
    length = self._length_of_row(self._row)
    tokens, segments, positions = (np.zeros(length, np.int32) for _ in range(3))
    filled = segment = 0
    while filled < length:
      if not len(self._rest):
        try:
          self._rest = np.asarray(next(self._parent)['tokens'], np.int32)
        except StopIteration:
          if filled == 0:
            raise
          break  # a finite stream's last row: padded
      take = min(length - filled, len(self._rest))
      segment += 1
      tokens[filled:filled + take] = self._rest[:take]
      segments[filled:filled + take] = segment
      positions[filled:filled + take] = np.arange(take)
      self._rest, filled = self._rest[take:], filled + take
    self._row += 1
    return add_targets({'tokens': tokens, 'tokens_segment_ids': segments, 'tokens_positions': positions})

  def get_state(self):
    return {'parent': self._parent.get_state(), 'rest': self._rest.tolist(), 'row': self._row}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._rest = np.asarray(state['rest'], np.int32)
    self._row = int(state['row'])


class _GrowingRows(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, length_of_row):
    super().__init__(parent)
    self._length_of_row = length_of_row

  def __iter__(self):
    return _GrowingRowsIterator(self._parent.__iter__(), self._length_of_row)


def pack_growing(docs: grain.IterDataset, stages, rows_per_step: int, pad_id: int = 0) -> grain.IterDataset:
  """`pack` with GrowLength's schedule: the rows of step s (rows s * rows_per_step ...) are
  `stage_length(stages, s)` tokens long. The stream runs on across a change of length (the next row takes
  the document where the last one cut it), rows and their features as `pack` makes them, and the iterator's
  state (the parent's, the cut document's rest and the row count) resumes exactly at any step."""
  stages = check_stages(stages)
  rows = _GrowingRows(docs, lambda row: stage_length(stages, row // rows_per_step))
  return rows.map(_Pad(pad_id))
