"""Format 'preference': pairs (prompt, chosen, rejected) -> the two rows of each pair side by side, [B, 2, max_length].

Config fields and defaults (besides data_dir, shuffle, num_threads, prefetch: `COMMON_DEFAULTS`):
  files              required        a glob or directory of preference JSONL files (data/preference_data.py)
  on_bad_line        'error'         a line that is not a valid pair stops the build, or is skipped ('skip')
  template           'zephyr'        the chat template (data/chat.py)
  tokenizer          'bytes'         or a path to a SentencePiece `.model`
  max_length         required        tokens per row: the prompt and one answer
  max_prompt_length  None            a longer prompt keeps its last max_prompt_length tokens (cut from the left)
  train_split        'train'         eval_split  'validation'
  ref_logps          None            an .npz of the reference's log-probabilities of each pair (python -m
                                     train.reference_logps writes it): each batch then holds 'ref_logps' [B, 2]

Each answer is rendered after its prompt with the template, and the row is the prompt's tokens then the answer's,
cut to max_length (the answer's end goes). The chosen row is [:, 0], the rejected one [:, 1]; a batch never
separates them. With ref_logps, a pair's values are found by `pair_key` (a hash of both rows' tokens and loss masks,
so a pair truncated otherwise than when they were computed is not found: an error says to recompute). Each row has the language-model features of 'chat' (tokens, segment_ids 1 on real tokens,
positions, targets, loss_mask): loss_mask is 1 exactly where the target is a token of that row's own answer (its
EOS included), 0 on the prompt and padding, so each answer is scored whole and on its own. A pair whose prompt
alone fills max_length has no room for an answer: it is skipped. Every start prints one line per split with the
pairs kept, truncated and skipped. Eval batches are padded with empty pairs (`mask` 0); the count is pairs.
"""
from collections.abc import Callable, Iterator
import collections
import hashlib
import json

import grain
import numpy as np

from .. import chat
from .. import preference_data
from .. import tokenizers
from ..sources import get_source
from . import base
from .chat import row_features

FEATURES = ('tokens', 'segment_ids', 'positions', 'targets', 'loss_mask')


class EncodePair:
  """A stored pair -> ({feature: int32 [2, max_length]}, 'kept' | 'truncated' | 'skipped')."""

  def __init__(self, tokenizer, template: str, max_length: int, max_prompt_length: int | None):
    self.tokenizer, self.template = tokenizer, template
    self.max_length, self.max_prompt_length = max_length, max_prompt_length

  def _row(self, prompt, answer):
    tokens, weights = chat.encode(prompt + answer, self.tokenizer, self.template)
    start = int(np.argmax(weights > 0)) if weights.any() else len(tokens)
    head, tail = (tokens[:start], weights[:start]), (tokens[start:], weights[start:])
    cut = False
    if self.max_prompt_length and len(head[0]) > self.max_prompt_length:
      head, cut = (head[0][-self.max_prompt_length:], head[1][-self.max_prompt_length:]), True
    if len(head[0]) >= self.max_length:
      return None, 'skipped'
    room = self.max_length - len(head[0])
    cut = cut or len(tail[0]) > room
    tokens = np.concatenate([head[0], tail[0][:room]])
    weights = np.concatenate([head[1], tail[1][:room]])
    n = len(tokens)
    padded, padded_weights = np.full(self.max_length, self.tokenizer.pad_id, np.int32), np.zeros(self.max_length, np.int32)
    padded[:n], padded_weights[:n] = tokens, weights
    seg = (np.arange(self.max_length) < n).astype(np.int32)
    row = row_features(padded, padded_weights, seg, np.where(seg > 0, np.arange(self.max_length), 0),
                       self.tokenizer.pad_id)
    return row, 'truncated' if cut else 'kept'

  def __call__(self, example):
    prompt, chosen, rejected = (json.loads(bytes(example[f]).decode('utf-8') if not isinstance(example[f], str)
                                           else example[f]) for f in ('prompt', 'chosen', 'rejected'))
    rows, states = zip(*(self._row(prompt, answer) for answer in (chosen, rejected)))
    if 'skipped' in states:
      return None, 'skipped'
    pair = {k: np.stack([rows[0][k], rows[1][k]]) for k in FEATURES}
    return pair, 'truncated' if 'truncated' in states else 'kept'


def pair_key(pair) -> str:
  """What identifies an encoded pair: both rows' tokens and loss masks, as the model scores them."""
  digest = hashlib.sha256(np.ascontiguousarray(pair['tokens'], np.int32).tobytes())
  digest.update(np.ascontiguousarray(pair['loss_mask'], np.int32).tobytes())
  return digest.hexdigest()


class RefLogps:
  """The reference log-probabilities of an .npz from `python -m train.reference_logps`: pair -> float32 [2]."""

  def __init__(self, path: str):
    from etils import epath
    try:
      with epath.Path(path).open('rb') as f:
        stored = np.load(f)
        keys, logps = stored['keys'], stored['logps']
    except (OSError, KeyError, ValueError) as e:
      raise ValueError(f'data.ref_logps={path!r} cannot be read ({e}); write it with python -m train.reference_logps '
                       '--config=<this config> --out=PATH.') from None
    self.path = path
    self.values = {str(k): v.astype(np.float32) for k, v in zip(keys, logps)}

  def __call__(self, pair) -> np.ndarray:
    found = self.values.get(pair_key(pair))
    if found is None:
      raise ValueError(f'a pair is missing from data.ref_logps={self.path!r}: the data, template, tokenizer or '
                       'max_length changed since it was written; rerun python -m train.reference_logps.')
    return found


class _Encoded:
  def __init__(self, encode, ref_logps: RefLogps | None = None):
    self.encode, self.ref_logps = encode, ref_logps

  def __call__(self, example):
    pair = self.encode(example)[0]
    if self.ref_logps is not None:
      pair = {**pair, 'ref_logps': self.ref_logps(pair)}
    return pair


class _Subset:
  """The pairs of a random-access source at `indices` (those that fit), itself random-access."""

  def __init__(self, source, indices):
    self.source, self.indices = source, list(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[i]]


class Preference(base.DataFormat):
  """Preference pairs for DPO; see the module docstring."""
  name = 'preference'
  defaults = {**base.COMMON_DEFAULTS, 'files': None, 'on_bad_line': 'error', 'template': 'zephyr',
              'tokenizer': 'bytes', 'max_prompt_length': None, 'train_split': 'train', 'eval_split': 'validation',
              'ref_logps': None}

  def _source(self, config, split_key):
    files = self.cfg(config, 'files')
    if not files:
      raise ValueError('data.files is required for the preference format: a glob of preference JSONL files.')
    builder_config = preference_data.files_config(files, self.cfg(config, 'on_bad_line'))
    return get_source('preference', self.cfg(config, split_key), self.cfg(config, 'data_dir'),
                      builder_config=builder_config)

  def _encode(self, config) -> EncodePair:
    template = self.cfg(config, 'template')
    chat.get_template(template)
    max_length = config.get('max_length')
    if not isinstance(max_length, (int, np.integer)) or max_length < 2:
      raise ValueError(f'data.max_length must be an int >= 2 (tokens per row), got {max_length!r}.')
    prompt = self.cfg(config, 'max_prompt_length')
    if prompt is not None and not (isinstance(prompt, (int, np.integer)) and 0 < prompt < max_length):
      raise ValueError(f'data.max_prompt_length={prompt!r} must be a whole number below max_length={max_length}.')
    return EncodePair(tokenizers.get_tokenizer(self.cfg(config, 'tokenizer')), template, int(max_length), prompt)

  def _kept(self, config, split_key, encode, announce: bool) -> tuple[list[int], collections.Counter]:
    """Indices of the split's pairs that fit, and the counts of kept, truncated and skipped ones (printed)."""
    src = self._source(config, split_key)
    counts, kept = collections.Counter(), []
    for i in range(len(src)):
      state = encode(src[i])[1]
      counts[state] += 1
      if state != 'skipped':
        kept.append(i)
    if announce:
      print(f'preference data {self.cfg(config, split_key)}: {len(kept)} pairs ({counts["truncated"]} truncated to '
            f'max_length={encode.max_length}{f"/max_prompt_length={encode.max_prompt_length}" if encode.max_prompt_length else ""}), '
            f'{counts["skipped"]} skipped (the prompt leaves no room for an answer)', flush=True)
    if not kept:
      raise ValueError(f'no pair of split {self.cfg(config, split_key)!r} fits data.max_length={encode.max_length}; '
                       'raise it or set data.max_prompt_length.')
    return kept, counts

  def _ref_logps(self, config) -> RefLogps | None:
    path = self.cfg(config, 'ref_logps')
    return RefLogps(path) if path else None

  def split_counts(self, config, split_key: str) -> collections.Counter:
    """How many pairs of the split are kept whole, truncated, or skipped (what each start prints)."""
    return self._kept(config, split_key, self._encode(config), announce=False)[1]

  def encoded_pairs(self, config, split_key: str):
    """Every pair of the split that fits (train_split or eval_split), encoded, in order: what a reference pass
    reads."""
    encode = self._encode(config)
    kept, _ = self._kept(config, split_key, encode, announce=True)
    src = self._source(config, split_key)
    for i in kept:
      yield encode(src[i])[0]

  def train_iter(self, config, *, global_batch_size, seed, process_index, process_count):
    batch_size = base.local_batch_size(global_batch_size, process_count)
    encode = self._encode(config)
    kept, _ = self._kept(config, 'train_split', encode, announce=process_index == 0)
    lo, hi = base.process_bounds(len(kept), process_index, process_count)
    if hi == lo:
      raise ValueError(f'Process {process_index} of {process_count} gets no training pairs.')
    ds = grain.MapDataset.source(_Subset(self._source(config, 'train_split'), kept[lo:hi]))
    if self.cfg(config, 'shuffle'):
      ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0]))
    pairs = ds.repeat().map(_Encoded(encode, self._ref_logps(config))).to_iter_dataset(self.read_options(config))
    return iter(pairs.batch(batch_size, drop_remainder=True))

  def eval_iter(self, config, *, global_batch_size, process_index,
                process_count) -> tuple[Callable[[], Iterator[dict]], int]:
    batch_size = base.local_batch_size(global_batch_size, process_count)
    encode = self._encode(config)
    kept, _ = self._kept(config, 'eval_split', encode, announce=process_index == 0)
    src = self._source(config, 'eval_split')
    bounds = [base.process_bounds(len(kept), p, process_count) for p in range(process_count)]
    num_batches = max(1, -(-max(hi - lo for lo, hi in bounds) // batch_size))
    lo, hi = bounds[process_index]
    encoded = _Encoded(encode, self._ref_logps(config))
    pairs = [encoded(src[i]) for i in kept[lo:hi]]
    empty = {k: np.zeros((2, encode.max_length), np.int32) for k in FEATURES}
    if encoded.ref_logps is not None:
      empty['ref_logps'] = np.zeros(2, np.float32)

    def batches():
      for b in range(num_batches):
        chunk = [pairs[i] if i < len(pairs) else empty for i in range(b * batch_size, (b + 1) * batch_size)]
        batch = {k: np.stack([p[k] for p in chunk]) for k in empty}
        batch['mask'] = np.asarray([b * batch_size + i < len(pairs) for i in range(batch_size)])
        yield batch

    return batches, len(kept)

  def num_train_examples(self, config) -> int:
    given = config.get('num_train_examples')
    if given:
      return int(given)
    return len(self._kept(config, 'train_split', self._encode(config), announce=False)[0])
