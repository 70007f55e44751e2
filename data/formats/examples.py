"""Format 'examples' (the default): one TFDS example per batch row, e.g. images and labels.

Config fields and defaults (besides data_dir, shuffle, num_threads, prefetch: `COMMON_DEFAULTS`):
  name         required; a TFDS name ('digits', 'mnist', 'imagenet2012:5.1.0', ...)
  train_split  'train'          eval_split  'test'   (TFDS split syntax, e.g. 'train[:90%]')
  pp_train     ''               pp_eval     ''       (pp strings, see `image_ops`)
  mix          None             (training only: MixUp/CutMix, see below)
  num_train_examples  None      the train split's records, to skip counting them (see below)
  augment_repeats  1            training only: repeated augmentation (see below)

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

Repeated augmentation (`augment_repeats` = k > 1; Hoffer et al. 2019, the "augmentation multiplicity" of
Fort et al. 2021): every record of the shuffled stream is followed by k - 1 copies of itself, each copy
preprocessed with its own RNG (pp_train's randomness is seeded by stream position, so the k copies get
independent crops, flips, ...). The shuffle is over distinct records, epoch by epoch as without repeats;
the copies are consecutive and the global batch size must be a multiple of k, so each global batch holds
B / k distinct records k times each (a process's share may split a record's copies with its neighbour's).
An epoch budget still counts model inputs against the split's records (num_train_examples is unchanged),
so at the same number of steps each record is seen k times less often, k augmentations at a time: the
cost of a run stays fixed and its passes through the data shrink by k, as in the fine-tuning of Smith et
al. 2023 (footnote 4). k > 1 with `mix` is refused: MixUp/CutMix would pair a record's copies with one
another and the batch's make-up would no longer be B / k records k times.
"""
from collections.abc import Callable, Iterator
import sys

import grain
import numpy as np

from .. import image_ops
from .. import mixing
from ..sources import get_source
from . import base


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


def _augment_repeats(config, global_batch_size: int | None = None) -> int:
  k = config.get('augment_repeats', None)
  k = 1 if k is None else k
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'data.augment_repeats={k!r} must be a whole number >= 1 (1: off); set '
                     '--config.data.augment_repeats.')
  if k > 1 and _mix_config(config) is not None:
    raise ValueError(f'data.augment_repeats={k} cannot be combined with data.mix (MixUp/CutMix); set '
                     '--config.data.augment_repeats=1 or --config.data.mix=None.')
  if global_batch_size is not None and global_batch_size % k:
    raise ValueError(f'batch_size={global_batch_size} is not a multiple of data.augment_repeats={k}, so a '
                     "record's copies would straddle two batches; use a batch size divisible by "
                     f'{k} or change --config.data.augment_repeats.')
  return k


class _EachRepeated(grain.MapDataset):
  """Every element of `parent` k times in a row: element i is parent[i // k]."""

  def __init__(self, parent: grain.MapDataset, k: int):
    super().__init__(parent)
    self._k = k
    self._length = min(len(parent) * k, sys.maxsize)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index // self._k]

  def __str__(self) -> str:
    return f'_EachRepeated(k={self._k})'


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


class Examples(base.DataFormat):
  """TFDS examples through pp strings, optionally mixed; see the module docstring."""
  name = 'examples'
  defaults = {**base.COMMON_DEFAULTS, 'train_split': 'train', 'eval_split': 'test',
              'pp_train': '', 'pp_eval': '', 'augment_repeats': 1}

  def _source(self, config, split_key):
    return get_source(self.cfg(config, 'name'), self.cfg(config, split_key),
                      self.cfg(config, 'data_dir'))

  def train_iter(self, config, *, global_batch_size, seed, process_index, process_count):
    """The global stream is the whole split, in a permutation drawn from `seed` anew every epoch
    (grain folds the epoch into the shuffle seed), each example augmented with an RNG from (seed,
    stream position). Global batch b is stream positions [b * B, (b + 1) * B) and process p reads
    only its contiguous share [b * B + p * B / P, b * B + (p + 1) * B / P), so the global batches
    depend on (seed, B) alone: P processes together see exactly what one process sees. With `mix`,
    each process mixes its share of 2B fresh examples, with an RNG from (seed, index of that share
    in the stream), so mixed batches do depend on P. Batches may span epoch boundaries. With
    augment_repeats = k, the stream is the shuffled records each k times in a row (positions, and so
    augmentation RNGs, count the copies).
    """
    batch_size = base.local_batch_size(global_batch_size, process_count)
    src = self._source(config, 'train_split')
    if len(src) == 0:
      raise ValueError(f'Train split {self.cfg(config, "train_split")!r} is empty.')
    mix = _mix_config(config)
    repeats = _augment_repeats(config, global_batch_size)
    shuffle_seed, pp_seed, mix_seed = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    ds = grain.MapDataset.source(src)
    if self.cfg(config, 'shuffle'):
      ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat()
    if repeats > 1:
      ds = _EachRepeated(ds, repeats)
    ds = ds.random_map(_Prepare(self.cfg(config, 'pp_train')), seed=pp_seed)
    if mix is None:
      ds = ds.batch(batch_size, drop_remainder=True)
    else:  # Each output example mixes two fresh ones (as in the NFNet reference).
      # Mixed before the share is taken, so the RNG index is the share's place in the whole stream.
      ds = ds.batch(2 * batch_size, drop_remainder=True).random_map(_Mix(**mix), seed=mix_seed)
    ds = base.process_share(ds, process_index, process_count)
    return iter(ds.to_iter_dataset(self.read_options(config)))

  def eval_iter(self, config, *, global_batch_size, process_index,
                process_count) -> tuple[Callable[[], Iterator[dict]], int]:
    """Global batch b is examples [b * B, (b + 1) * B) of the split in order, the last one padded
    with masked (mask=False) copies of a real example; process p reads its contiguous share of
    each, as in training. So every example appears exactly once over all processes with
    mask=True, every process yields the same number of batches, and the global batches do not
    depend on P. The count is the number of examples in the split.
    """
    batch_size = base.local_batch_size(global_batch_size, process_count)
    src = self._source(config, 'eval_split')
    n = len(src)
    if n == 0:
      raise ValueError(f'Eval split {self.cfg(config, "eval_split")!r} is empty.')
    num_batches = -(-n // global_batch_size)
    ds = grain.MapDataset.source(_Padded(src, num_batches * global_batch_size))
    ds = ds.random_map(_PrepareWithMask(self.cfg(config, 'pp_eval')), seed=0)
    ds = base.process_share(ds.batch(batch_size, drop_remainder=True), process_index,
                            process_count)
    ds = ds.to_iter_dataset(self.read_options(config))
    return (lambda: iter(ds)), n

  def num_train_examples(self, config) -> int:
    """The split's records (or the config's `num_train_examples`), half as many with `mix`; augment_repeats
    does not change it (see the module docstring)."""
    _augment_repeats(config)
    given = config.get('num_train_examples')
    records = int(given) if given else len(self._source(config, 'train_split'))
    return records // 2 if _mix_config(config) else records
