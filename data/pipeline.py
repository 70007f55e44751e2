"""Input pipelines: TFDS ArrayRecord data sources fed through grain, without TensorFlow.

The data config's `format` field (absent or None: 'examples') picks the batch format, a
`formats.DataFormat` in the registry `formats.FORMATS`; the functions below look it up
(`formats.get_format`, which names the known formats when one is unknown) and call it:
  'examples'     TFDS examples (e.g. images and labels) through pp strings, optionally MixUp/CutMix
                 mixed; config fields and batches in `formats/examples.py`
  'packed_text'  tokenized documents packed into rows with targets and a per-token loss weight
                 (`loss_mask`) for language models; config fields and batches in
                 `formats/packed_text.py`
Every format shares the fields data_dir, shuffle, num_threads and prefetch
(`formats.COMMON_DEFAULTS`). Global batches do not depend on the process count, except where a
format says so (mixing); training iterators resume exactly from `get_state`/`set_state`.
"""
from collections.abc import Callable, Iterator

import grain

from . import formats
from .sources import OWN_BUILDERS  # noqa: F401  (re-exported)
from .sources import get_source  # noqa: F401  (re-exported)


def make_train_iter(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of this process's share of each global training batch."""
  return formats.get_format(data_config).train_iter(
      data_config, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
      process_count=process_count)


def make_eval_iter(data_config, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> tuple[Callable[[], Iterator[dict]], int]:
  """(fn giving a fresh iterator of local eval batches, count: examples, or real tokens for
  packed_text); every example appears exactly once over all processes."""
  return formats.get_format(data_config).eval_iter(
      data_config, global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count)


def num_train_examples(data_config) -> int:
  """Training examples (model inputs) in one epoch of the train split, for epoch budgets.

  The split's records, half as many with `mix` (each mixed example consumes two); for packed_text
  the rows its tokens pack into. A `num_train_examples` field in the config gives the records
  (rows) instead of counting them: for a split too large to count, or one not at hand.
  """
  return formats.get_format(data_config).num_train_examples(data_config)


def make_lm_train_iter(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """`make_train_iter` of the 'packed_text' format, whatever `data_config.format` says."""
  return formats.FORMATS['packed_text'].train_iter(
      data_config, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
      process_count=process_count)


def make_lm_eval_iter(data_config, *, global_batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> tuple[Callable[[], Iterator[dict]], int]:
  """`make_eval_iter` of the 'packed_text' format, whatever `data_config.format` says."""
  return formats.FORMATS['packed_text'].eval_iter(
      data_config, global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count)
