"""Input pipelines: TFDS ArrayRecord data sources fed through grain, without TensorFlow.

Config (`ml_collections.ConfigDict` or plain dict) fields and defaults:
  name         required; a TFDS name ('digits', 'mnist', 'imagenet2012:5.1.0', ...)
  data_dir     None (TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets)
  train_split  'train'          eval_split  'test'   (TFDS split syntax, e.g. 'train[:90%]')
  pp_train     ''               pp_eval     ''       (pp strings, see `image_ops`)
  shuffle      True             (training only)
  num_threads  4                prefetch    4        (grain ReadOptions; prefetch counts batches)
  mix          None             (training only: MixUp/CutMix, see below)

Batches are dicts of numpy arrays with the local batch first: int64 -> int32, float64 -> float32,
and `image` always float32. Training batches have no `mask`; eval batches carry `mask` (bool).

Mixing (`mix`, None or absent = off; a dict or ConfigDict, whose absent fields take the defaults):
  mixup_alpha  0.2    Beta(alpha, alpha) MixUp on the first half of each batch (None or 0: off)
  cutmix_alpha 1.0    CutMix on the second half (None or 0: off; at least one must be on)
  pp_after     ''     pp string applied to each example AFTER mixing
It follows the NFNet reference (`mixing.mix_batch`): each training batch of B examples is mixed from
2B fresh preprocessed examples, pairing distinct examples with a lambda per example, so an epoch of
the data takes half as many steps as without mixing. pp_train must give float-able `image`s of one
shape and soft `labels` ([classes], e.g. `onehot`); mixed labels are lam * y_a + (1 - lam) * y_b and
still sum to one; other keys (e.g. `label`) keep the value of the example weighted lam. The
reference applies RandAugment and normalisation after mixing (its NFNet config sets
augment_before_mix=False); to reproduce that, leave pp_train in 0..255 and put them in pp_after:
  pp_train='decode|inception_crop(224)|flip_lr|onehot(1000)|keep("image", "labels")',
  mix=dict(mixup_alpha=0.2, cutmix_alpha=1.0, pp_after='randaugment(4, 10)|value_range(-1, 1)')
The mixing randomness, and each pp_after example's, is seeded from (seed, index of the mixed chunk
in the global stream), so get_state/set_state resume exactly. Each process mixes within its own
share of a global batch, so mixed batches (unlike unmixed ones) depend on the process count.
"""
from collections.abc import Callable, Iterator, Sequence
import os

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from . import digits
from . import image_ops
from . import mixing
from . import packing
from . import text
from . import tokenizers

# Offline builders of this package, prepared on first use.
OWN_BUILDERS = (digits.Digits.name, text.LocalText.name)

_DEFAULTS = dict(data_dir=None, train_split='train', eval_split='test', pp_train='',
                 pp_eval='', shuffle=True, num_threads=4, prefetch=4)


def _cfg(config, key):
  if key not in _DEFAULTS:
    return config[key]
  value = config.get(key, _DEFAULTS[key])
  return _DEFAULTS[key] if value is None else value


def _lm_cfg(config, key):
  if key in _LM_DEFAULTS:
    value = config.get(key, None)
    return _LM_DEFAULTS[key] if value is None else value
  return _cfg(config, key)


def _where(data_dir) -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'


def _build_hint(name, data_dir) -> str:
  return f'`tfds build {name} --data_dir={_where(data_dir)} --file_format=array_record`'


def get_source(name: str, split: str, data_dir: str | None = None, *,
               builder_config=None) -> Sequence[dict]:
  """Random-access TFDS source (ArrayRecord) for `split` of `name`; own builders are prepared.

  `builder_config` (a `tfds.core.BuilderConfig`, e.g. `text.files_config(glob)`) overrides the
  config named in `name`.
  """
  kwargs = {} if builder_config is None else {'config': builder_config}
  try:
    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f'TFDS dataset {name!r} not found: no registered builder and no prepared copy under '
        f'{_where(data_dir)}; prepare it with {_build_hint(name, data_dir)}.') from None
  if not builder.is_prepared():
    if builder.name not in OWN_BUILDERS:
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared: nothing at {builder.data_dir}; prepare it '
          f'with {_build_hint(name, data_dir)}.')
    # Processes sharing a data_dir should not race here: prepare it once before a multi-host run.
    builder.download_and_prepare()
  info = builder.info
  if not info.available_file_formats() & file_adapters.FileFormat.with_random_access():
    raise FileNotFoundError(
        f'TFDS dataset {name!r} at {builder.data_dir} has no ArrayRecord files (it is stored as '
        f'{info.file_format.value}); re-prepare it with {_build_hint(name, data_dir)}.')
  names = [p.split('[')[0].strip() for p in split.split('+')] if isinstance(split, str) else []
  unknown = [s for s in names if s not in info.splits]
  if unknown:
    raise ValueError(f'Unknown split {unknown[0]!r} of TFDS dataset {name!r}; available '
                     f'splits: {", ".join(sorted(info.splits))}.')
  return builder.as_data_source(split=split)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}.')
  return global_batch_size // process_count


def _process_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous, disjoint [lo, hi) ranges covering range(n); sizes differ by at most one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count}).')
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _finalize(example: dict) -> dict:
  out = {}
  for k, v in example.items():
    v = np.asarray(v)
    if k == 'image' or v.dtype == np.float64:
      v = v.astype(np.float32)
    elif v.dtype == np.int64:
      v = v.astype(np.int32)
    out[k] = v
  return out


class _Prepare:
  """pp + dtype normalisation; a class (not a closure) so it pickles for grain worker processes."""

  def __init__(self, pp: str):
    self.pp = image_ops.Preprocess(pp)

  def __call__(self, example, rng):
    return _finalize(self.pp(example, rng))


class _PrepareWithMask(_Prepare):
  """Maps (record, is_real) to a preprocessed example with its `mask`."""

  def __call__(self, item, rng):
    record, is_real = item
    return {**super().__call__(record, rng), 'mask': np.bool_(is_real)}


_MIX_DEFAULTS = dict(mixup_alpha=0.2, cutmix_alpha=1.0, pp_after='')


def _mix_config(config) -> dict | None:
  mix = config.get('mix', None)
  if mix is None:
    return None
  mix = dict(mix.to_dict() if hasattr(mix, 'to_dict') else mix)
  unknown = sorted(set(mix) - set(_MIX_DEFAULTS))
  if unknown:
    raise ValueError(f'Unknown mix field(s) {unknown}; known: {sorted(_MIX_DEFAULTS)}.')
  mix = {**_MIX_DEFAULTS, **mix}
  if not (mix['mixup_alpha'] or mix['cutmix_alpha']):
    raise ValueError('mix needs mixup_alpha or cutmix_alpha > 0 (or mix=None for no mixing).')
  return mix


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class _Mix:
  """Mixes a batch of 2B into B (`mixing.mix_batch`), then runs `pp_after` on every example."""

  def __init__(self, mixup_alpha, cutmix_alpha, pp_after):
    self.alphas = mixup_alpha, cutmix_alpha
    self.pp_after = _Prepare(pp_after) if pp_after and pp_after.strip() else None

  def __call__(self, batch, rng):
    batch = mixing.mix_batch(batch, rng, *self.alphas)
    if self.pp_after is None:
      return _finalize(batch)
    n = len(batch['image'])
    seeds = rng.integers(2**63, size=n)
    return _stack([self.pp_after({k: v[i] for k, v in batch.items()}, np.random.default_rng(s))
                   for i, s in enumerate(seeds)])


def _read_options(config) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_cfg(config, 'num_threads'),
                           prefetch_buffer_size=_cfg(config, 'prefetch'))


def _is_packed_text(data_config) -> bool:
  fmt = data_config.get('format', 'examples') or 'examples'
  if fmt not in ('examples', 'packed_text'):
    raise ValueError(f"data.format={fmt!r} is unknown; use 'examples' (images, labels) or 'packed_text'.")
  return fmt == 'packed_text'


def _process_share(chunks: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Chunk b * process_count + process_index of `chunks` for b = 0, 1, ...: this process's share.

  With `chunks` the local-batch-sized runs of a global stream, global batch b is chunks
  [b * P, (b + 1) * P) and process p reads (lazily) only the p-th of them.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count}).')
  return chunks[process_index::process_count]


def make_train_iter(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of this process's share of each global training batch.

  A config with `format='packed_text'` reads tokenized, packed text rows (see `make_lm_train_iter`).

  The global stream is the whole split, in a permutation drawn from `seed` anew every epoch (grain
  folds the epoch into the shuffle seed), each example augmented with an RNG from (seed, stream
  position). Global batch b is stream positions [b * B, (b + 1) * B) and process p reads only its
  contiguous share [b * B + p * B / P, b * B + (p + 1) * B / P), so the global batches depend on
  (seed, B) alone: P processes together see exactly what one process sees. With `mix`, each process
  mixes its share of 2B fresh examples, with an RNG from (seed, index of that share in the stream),
  so mixed batches do depend on P. `get_state`/`set_state` (or grain.checkpoint.CheckpointSave/Restore)
  resume exactly. Batches may span epoch boundaries.
  """
  if _is_packed_text(data_config):
    return make_lm_train_iter(data_config, global_batch_size=global_batch_size, seed=seed,
                              process_index=process_index, process_count=process_count)
  batch_size = _local_batch_size(global_batch_size, process_count)
  src = get_source(_cfg(data_config, 'name'), _cfg(data_config, 'train_split'),
                   _cfg(data_config, 'data_dir'))
  if len(src) == 0:
    raise ValueError(f'Train split {_cfg(data_config, "train_split")!r} is empty.')
  mix = _mix_config(data_config)
  shuffle_seed, pp_seed, mix_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
  ds = grain.MapDataset.source(src)
  if _cfg(data_config, 'shuffle'):
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat().random_map(_Prepare(_cfg(data_config, 'pp_train')), seed=pp_seed)
  if mix is None:
    ds = ds.batch(batch_size, drop_remainder=True)
  else:  # Each output example mixes two fresh ones (as in the NFNet reference).
    # Mixed before the share is taken, so the RNG index is the share's place in the whole stream.
    ds = ds.batch(2 * batch_size, drop_remainder=True).random_map(_Mix(**mix), seed=mix_seed)
  ds = _process_share(ds, process_index, process_count)
  return iter(ds.to_iter_dataset(_read_options(data_config)))


class _Padded:
  """The records of `src` as (record, True), then (src[0], False) up to `size`."""

  def __init__(self, src, size: int):
    self._src, self._size = src, size

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, i: int):
    if i < len(self._src):
      return self._src[i], True
    return self._src[0], False


def make_eval_iter(data_config, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> tuple[Callable[[], Iterator[dict]], int]:
  """Returns (fn giving a fresh iterator of local eval batches, number of examples in the split).

  A config with `format='packed_text'` gives packed text rows and the number of real tokens instead.

  Global batch b is examples [b * B, (b + 1) * B) of the split in order, the last one padded with
  masked (mask=False) copies of a real example; process p reads its contiguous share of each, as
  in training. So every example appears exactly once over all processes with mask=True, every
  process yields the same number of batches, and the global batches do not depend on P.
  """
  if _is_packed_text(data_config):
    return make_lm_eval_iter(data_config, global_batch_size=global_batch_size, process_index=process_index,
                             process_count=process_count)
  batch_size = _local_batch_size(global_batch_size, process_count)
  src = get_source(_cfg(data_config, 'name'), _cfg(data_config, 'eval_split'),
                   _cfg(data_config, 'data_dir'))
  n = len(src)
  if n == 0:
    raise ValueError(f'Eval split {_cfg(data_config, "eval_split")!r} is empty.')
  num_batches = -(-n // global_batch_size)
  ds = grain.MapDataset.source(_Padded(src, num_batches * global_batch_size))
  ds = ds.random_map(_PrepareWithMask(_cfg(data_config, 'pp_eval')), seed=0)
  ds = _process_share(ds.batch(batch_size, drop_remainder=True), process_index, process_count)
  ds = ds.to_iter_dataset(_read_options(data_config))
  return (lambda: iter(ds)), n


# ---------------------------------------------------------------------------------------------
# Language-model pipelines: documents -> tokens -> packed rows (see `packing` for row features).
#
# Config fields and defaults (with num_threads, prefetch, shuffle and data_dir as above):
#   name         'local_text/stdlib'   a TFDS text dataset with a `text` feature (see `text`)
#   files        None                  a glob or directory: overrides `name`'s corpus with
#                                      `local_text` config `text.files_config(files)`
#   train_split  'train'               eval_split  'validation'
#   tokenizer    'bytes'               or a path to a SentencePiece `.model` (see `tokenizers`)
#   seq_len      required              tokens per row
_LM_DEFAULTS = dict(name='local_text/stdlib', files=None, train_split='train',
                    eval_split='validation', tokenizer='bytes')


def _lm_source(config, split_key):
  files = _lm_cfg(config, 'files')
  name = 'local_text' if files else _lm_cfg(config, 'name')
  return get_source(name, _lm_cfg(config, split_key), _cfg(config, 'data_dir'),
                    builder_config=text.files_config(files) if files else None)


def _seq_len(config) -> int:
  seq_len = config.get('seq_len', None)
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f'seq_len must be an int >= 2, got {seq_len!r}.')
  return int(seq_len)


def make_lm_train_iter(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of local batches of packed rows, dicts of int32 [B, L].

  This process reads the contiguous document slice `_process_bounds` gives it (disjoint across
  processes), reshuffled every epoch from (seed, process_index) unless shuffle=False, tokenizes each
  document with bos/eos and packs the stream into rows (`packing.pack`); rows and batches run across
  epoch boundaries. `get_state`/`set_state` (or grain.checkpoint) resume exactly.
  """
  batch_size = _local_batch_size(global_batch_size, process_count)
  seq_len = _seq_len(data_config)
  tokenizer = tokenizers.get_tokenizer(_lm_cfg(data_config, 'tokenizer'))
  src = _lm_source(data_config, 'train_split')
  lo, hi = _process_bounds(len(src), process_index, process_count)
  if hi == lo:
    raise ValueError(f'Process {process_index} of {process_count} gets no training documents.')
  shuffle_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  ds = grain.MapDataset.source(src)[lo:hi]
  if _cfg(data_config, 'shuffle'):
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat().map(packing.Tokenize(tokenizer)).to_iter_dataset(_read_options(data_config))
  ds = packing.pack(ds, seq_len, tokenizer.pad_id).batch(batch_size, drop_remainder=True)
  return iter(ds)


def make_lm_eval_iter(data_config, *, global_batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> tuple[Callable[[], Iterator[dict]], int]:
  """Returns (fn giving a fresh iterator of local eval batches, number of real eval tokens).

  Process p packs its document slice of the eval split (in split order) into rows, then appends
  all-padding rows (segment_ids 0, loss_mask 0) so that every process yields the same number of
  full batches. Over all processes every token of every document ([bos] + text + [eos]) appears
  exactly once with segment_ids > 0; the returned count is the number of such tokens.
  """
  batch_size = _local_batch_size(global_batch_size, process_count)
  seq_len = _seq_len(data_config)
  tokenizer = tokenizers.get_tokenizer(_lm_cfg(data_config, 'tokenizer'))
  src = _lm_source(data_config, 'eval_split')
  if len(src) == 0:
    raise ValueError(f'Eval split {_lm_cfg(data_config, "eval_split")!r} is empty.')
  tokenize = packing.Tokenize(tokenizer)
  # Every process counts every document's tokens, to agree on the number of batches.
  lengths = grain.MapDataset.source(src).map(lambda ex: len(tokenize(ex)['tokens']))
  lengths = np.asarray(list(lengths.to_iter_dataset(_read_options(data_config))), np.int64)
  bounds = [_process_bounds(len(src), p, process_count) for p in range(process_count)]
  rows = [packing.num_rows(lengths[lo:hi], seq_len) for lo, hi in bounds]
  num_batches = max(1, -(-max(rows) // batch_size))
  lo, hi = bounds[process_index]
  docs = grain.MapDataset.source(src)[lo:hi].map(tokenize).to_iter_dataset(
      _read_options(data_config))
  packed = packing.pack(docs, seq_len, tokenizer.pad_id)
  padding = packing.padding_row(seq_len, tokenizer.pad_id)

  def batches():
    real = iter(packed)
    for _ in range(num_batches):
      out = [next(real, padding) for _ in range(batch_size)]
      yield {k: np.stack([r[k] for r in out]) for k in packing.FEATURES}
    if next(real, None) is not None:
      raise RuntimeError('Eval packing made more rows than counted.')

  return batches, int(lengths.sum())


def num_train_examples(data_config) -> int:
  """Training examples (model inputs) in one epoch of the train split, for epoch budgets.

  The split's records, half as many with `mix` (each mixed example consumes two); for packed_text the rows
  its tokens pack into, ceil(tokens / seq_len), counted by tokenizing the whole split once. A
  `num_train_examples` field in the config gives the records (rows) instead of counting them: for a split
  too large to count, or one not at hand.
  """
  given = data_config.get('num_train_examples')
  if _is_packed_text(data_config):
    if given:
      return int(given)
    tokenize = packing.Tokenize(tokenizers.get_tokenizer(_lm_cfg(data_config, 'tokenizer')))
    lengths = grain.MapDataset.source(_lm_source(data_config, 'train_split')).map(
        lambda ex: len(tokenize(ex)['tokens']))
    return packing.num_rows(list(lengths.to_iter_dataset(_read_options(data_config))), _seq_len(data_config))
  records = int(given) if given else len(
      get_source(_cfg(data_config, 'name'), _cfg(data_config, 'train_split'), _cfg(data_config, 'data_dir')))
  return records // 2 if _mix_config(data_config) else records
