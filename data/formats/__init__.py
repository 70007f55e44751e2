"""Data formats: `data.format` names the `DataFormat` that makes a config's batches.

  examples     (the default, also for an absent or None `format`) one TFDS example per row,
               e.g. images and labels; see `formats.examples`
  packed_text  tokenized documents packed into rows of `seq_len`; see `formats.packed_text`
  chat         conversations through a chat template, trained on the assistant's replies; see `formats.chat`
  preference   pairs of answers (chosen, rejected) to one prompt, side by side; see `formats.preference`

`get_format(data_config)` looks the format up once and `data.pipeline` calls its methods. A new
format subclasses `DataFormat` (in its own module) and is registered with `register(instance)`;
nothing else dispatches on the name.
"""
from .base import COMMON_DEFAULTS
from .base import DataFormat
from .chat import Chat
from .examples import Examples
from .packed_text import PackedText
from .preference import Preference

DEFAULT = 'examples'

# Name -> format; fill it through `register`.
FORMATS: dict[str, DataFormat] = {}


def register(fmt: DataFormat, *, replace: bool = False) -> DataFormat:
  """Adds `fmt` under `fmt.name` (an existing name only with replace=True); returns it."""
  if not isinstance(fmt, DataFormat):
    raise TypeError(f'{fmt!r} is not a DataFormat instance.')
  if not fmt.name:
    raise ValueError(f'{type(fmt).__name__} has no `name`.')
  if fmt.name in FORMATS and not replace:
    raise ValueError(f'data format {fmt.name!r} is already registered ({FORMATS[fmt.name]!r}); '
                     f'pass replace=True to replace it.')
  FORMATS[fmt.name] = fmt
  return fmt


def get_format(data_config) -> DataFormat:
  """The format `data_config.format` names ('examples' where absent or None)."""
  name = data_config.get('format', None) or DEFAULT
  if not isinstance(name, str) or name not in FORMATS:
    raise ValueError(f'data.format={name!r} is unknown; known formats: '
                     f'{", ".join(repr(k) for k in sorted(FORMATS))}.')
  return FORMATS[name]


register(Examples())
register(PackedText())
register(Chat())
register(Preference())

__all__ = ['COMMON_DEFAULTS', 'DEFAULT', 'Chat', 'DataFormat', 'Examples', 'FORMATS', 'PackedText',
           'Preference', 'get_format', 'register']
