"""The `DataFormat` interface, and the batching helpers the formats share."""
import abc
from collections.abc import Callable, Iterator, Mapping

import grain

# Fields every format reads, and their defaults: the TFDS data_dir (None: $TFDS_DATA_DIR or
# ~/tensorflow_datasets), whether training reshuffles every epoch, and grain's ReadOptions
# (prefetch counts batches).
COMMON_DEFAULTS = dict(data_dir=None, shuffle=True, num_threads=4, prefetch=4)


class DataFormat(abc.ABC):
  """One kind of batch (its features and meaning) and the train/eval pipelines that make it.

  A subclass sets `name`, the `data.format` value that selects it, and `defaults`, its config
  fields with their defaults (`COMMON_DEFAULTS` included); `cfg` reads a field, where an absent
  field or a None value means the default and a field without a default is required. Register an
  instance with `data.formats.register` and `data.pipeline` dispatches to it.

  Contract of the pipelines (the training loop relies on it):
  - batches are dicts of numpy arrays with this process's share of the global batch first;
  - `train_iter` is infinite and deterministic in its arguments, and `get_state`/`set_state` (a
    grain iterator's, so grain.checkpoint can save it) resume it exactly;
  - `eval_iter` gives (a function returning a fresh iterator over one pass, a count): every
    process yields the same number of batches, and the count is what the eval metrics are
    normalised by (examples, tokens, ...), summed over all processes.
  """
  name: str = ''
  defaults: Mapping = COMMON_DEFAULTS

  def cfg(self, config, key):
    """`config[key]`, or its default where absent or None (a field without one is required)."""
    if key not in self.defaults:
      return config[key]
    value = config.get(key, None)
    return self.defaults[key] if value is None else value

  def read_options(self, config) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=self.cfg(config, 'num_threads'),
                             prefetch_buffer_size=self.cfg(config, 'prefetch'))

  @abc.abstractmethod
  def train_iter(self, config, *, global_batch_size: int, seed: int, process_index: int,
                 process_count: int) -> Iterator[dict]:
    """Infinite, checkpointable iterator of this process's share of each global training batch."""

  @abc.abstractmethod
  def eval_iter(self, config, *, global_batch_size: int, process_index: int,
                process_count: int) -> tuple[Callable[[], Iterator[dict]], int]:
    """(fn giving a fresh iterator of local eval batches, count over the whole eval split)."""

  @abc.abstractmethod
  def num_train_examples(self, config) -> int:
    """Model inputs (batch rows) in one epoch of the train split, for epoch budgets."""


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}.')
  return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count}).')


def process_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous, disjoint [lo, hi) ranges covering range(n); sizes differ by at most one."""
  _check_process(process_index, process_count)
  return n * process_index // process_count, n * (process_index + 1) // process_count


def process_share(chunks: grain.MapDataset, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """Chunk b * process_count + process_index of `chunks` for b = 0, 1, ...: this process's share.

  With `chunks` the local-batch-sized runs of a global stream, global batch b is chunks
  [b * P, (b + 1) * P) and process p reads (lazily) only the p-th of them.
  """
  _check_process(process_index, process_count)
  return chunks[process_index::process_count]
