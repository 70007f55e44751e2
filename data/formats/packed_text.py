"""Format 'packed_text': documents -> tokens -> fixed-length packed rows, for language models.

Config fields and defaults (besides data_dir, shuffle, num_threads, prefetch: `COMMON_DEFAULTS`):
  name         'local_text/stdlib'   a TFDS text dataset with a `text` feature (see `text`)
  files        None                  a glob or directory: overrides `name`'s corpus with
                                     `local_text` config `text.files_config(files)`
  train_split  'train'               eval_split  'validation'
  tokenizer    'bytes'               or a path to a SentencePiece `.model` (see `tokenizers`)
  seq_len      required              tokens per row (with grow_length: of the evaluation rows only)
  grow_length  None                  GrowLength: ((0, 128), (1000, 512), ...), the training rows' length
                                     from each start step on (`packing.pack_growing`); evaluation keeps seq_len
  num_train_examples  None           the train split's rows, to skip tokenizing it to count them

Batches, in training and eval alike, are dicts of int32 [B, seq_len] with the features
`packing.FEATURES` (see `packing` for their exact definition):
  tokens       the input token ids (the tokenizer's pad_id where padding)
  segment_ids  1, 2, ... per document piece within a row, 0 for padding: attend within a segment
  positions    position within the segment (restarting at 0 in every segment)
  targets      the token to predict at each position (the next one of the same segment, else 0)
  loss_mask    the per-token loss weight (int or float): the language-model objective weights
               the loss at each position by it, so 0 excludes the token. Packing gives 1 where
               `targets` holds a next token and 0 elsewhere (a segment's last token, padding, the
               all-padding eval rows); formats for other data (e.g. chat rows trained on replies
               only) give the same features with their own weights.
"""
from collections.abc import Callable, Iterator

import grain
import numpy as np

from .. import packing
from .. import text
from .. import tokenizers
from ..sources import get_source
from . import base


def _seq_len(config) -> int:
  seq_len = config.get('seq_len', None)
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f'seq_len must be an int >= 2, got {seq_len!r}.')
  return int(seq_len)


class PackedText(base.DataFormat):
  """Tokenized documents packed into rows of `seq_len`; see the module docstring."""
  name = 'packed_text'
  defaults = {**base.COMMON_DEFAULTS, 'name': 'local_text/stdlib', 'files': None,
              'train_split': 'train', 'eval_split': 'validation', 'tokenizer': 'bytes', 'grow_length': None}

  def _source(self, config, split_key):
    files = self.cfg(config, 'files')
    name = 'local_text' if files else self.cfg(config, 'name')
    return get_source(name, self.cfg(config, split_key), self.cfg(config, 'data_dir'),
                      builder_config=text.files_config(files) if files else None)

  def _tokenize(self, config):
    return packing.Tokenize(tokenizers.get_tokenizer(self.cfg(config, 'tokenizer')))

  def _doc_lengths(self, config, src, tokenize) -> np.ndarray:
    lengths = grain.MapDataset.source(src).map(lambda ex: len(tokenize(ex)['tokens']))
    return np.asarray(list(lengths.to_iter_dataset(self.read_options(config))), np.int64)

  def train_iter(self, config, *, global_batch_size, seed, process_index, process_count):
    """This process reads the contiguous document slice `base.process_bounds` gives it (disjoint
    across processes), reshuffled every epoch from (seed, process_index) unless shuffle=False,
    tokenizes each document with bos/eos and packs the stream into rows (`packing.pack`); rows and
    batches run across epoch boundaries.
    """
    batch_size = base.local_batch_size(global_batch_size, process_count)
    seq_len = _seq_len(config)
    tokenize = self._tokenize(config)
    src = self._source(config, 'train_split')
    lo, hi = base.process_bounds(len(src), process_index, process_count)
    if hi == lo:
      raise ValueError(f'Process {process_index} of {process_count} gets no training documents.')
    shuffle_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    ds = grain.MapDataset.source(src)[lo:hi]
    if self.cfg(config, 'shuffle'):
      ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat().map(tokenize).to_iter_dataset(self.read_options(config))
    stages = self.cfg(config, 'grow_length')
    if stages:
      ds = packing.pack_growing(ds, stages, batch_size, tokenize.tokenizer.pad_id)
    else:
      ds = packing.pack(ds, seq_len, tokenize.tokenizer.pad_id)
    return iter(ds.batch(batch_size, drop_remainder=True))

  def eval_iter(self, config, *, global_batch_size, process_index,
                process_count) -> tuple[Callable[[], Iterator[dict]], int]:
    """Process p packs its document slice of the eval split (in split order) into rows, then
    appends all-padding rows (`packing.padding_row`: segment_ids, targets and loss_mask 0) so that
    every process yields the same number of full batches. Over all processes every token of every
    document ([bos] + text + [eos]) appears exactly once with segment_ids > 0; the count is the
    number of such tokens.
    """
    batch_size = base.local_batch_size(global_batch_size, process_count)
    seq_len = _seq_len(config)
    tokenize = self._tokenize(config)
    src = self._source(config, 'eval_split')
    if len(src) == 0:
      raise ValueError(f'Eval split {self.cfg(config, "eval_split")!r} is empty.')
    # Every process counts every document's tokens, to agree on the number of batches.
    lengths = self._doc_lengths(config, src, tokenize)
    bounds = [base.process_bounds(len(src), p, process_count) for p in range(process_count)]
    rows = [packing.num_rows(lengths[lo:hi], seq_len) for lo, hi in bounds]
    num_batches = max(1, -(-max(rows) // batch_size))
    lo, hi = bounds[process_index]
    docs = grain.MapDataset.source(src)[lo:hi].map(tokenize).to_iter_dataset(
        self.read_options(config))
    packed = packing.pack(docs, seq_len, tokenize.tokenizer.pad_id)
    padding = packing.padding_row(seq_len, tokenize.tokenizer.pad_id)

    def batches():
      real = iter(packed)
      for _ in range(num_batches):
        out = [next(real, padding) for _ in range(batch_size)]
        yield {k: np.stack([r[k] for r in out]) for k in packing.FEATURES}
      if next(real, None) is not None:
        raise RuntimeError('Eval packing made more rows than counted.')

    return batches, int(lengths.sum())

  def num_train_examples(self, config) -> int:
    """The config's `num_train_examples`, else the rows the split's tokens pack into,
    ceil(tokens / seq_len), counted by tokenizing the whole split once."""
    given = config.get('num_train_examples')
    if given:
      return int(given)
    seq_len = _seq_len(config)
    src = self._source(config, 'train_split')
    return packing.num_rows(self._doc_lengths(config, src, self._tokenize(config)), seq_len)
