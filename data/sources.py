"""TFDS data sources: random-access ArrayRecord splits, read through grain without TensorFlow."""
from collections.abc import Sequence
import os

import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants, file_adapters

from . import chat_data
from . import digits
from . import preference_data
from . import text
from . import textures

# Offline builders of this package, prepared on first use.
OWN_BUILDERS = (chat_data.Chat.name, digits.Digits.name, preference_data.Preference.name, text.LocalText.name,
                textures.Textures.name)


OWN_SPLITS = ('train', 'validation', 'test')  # What our builders split into, by hash.


def _where(data_dir) -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'


def _build_hint(name, data_dir) -> str:
  return f'`tfds build {name} --data_dir={_where(data_dir)} --file_format=array_record`'


def _is_prepared(builder) -> bool:
  """builder.is_prepared(), without its warning 'Variant folder ... has no dataset_info.json' for a dataset not
  built yet: the first run of each of our own builders meets that, and prepares the dataset."""
  return (builder.data_path / constants.DATASET_INFO_FILENAME).exists() and builder.is_prepared()


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
  if not _is_prepared(builder):
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
  parts = [p.strip() for p in split.split('+')] if isinstance(split, str) else []
  names = [p.split('[')[0].strip() for p in parts]
  if builder.name in OWN_BUILDERS and len(parts) > 1 and any(n in info.splits for n in names):
    # Our builders leave out a split the data leaves empty (TFDS stores none): in a sum, it adds nothing.
    kept = [p for p, n in zip(parts, names) if n in info.splits or n not in OWN_SPLITS]
    split, names = '+'.join(kept), [p.split('[')[0].strip() for p in kept]
  unknown = [s for s in names if s not in info.splits]
  if unknown:
    raise ValueError(f'Unknown split {unknown[0]!r} of TFDS dataset {name!r}; available '
                     f'splits: {", ".join(sorted(info.splits))}.')
  return builder.as_data_source(split=split)
