"""`local_text`: a TFDS dataset of local text files, one example per file, built offline.

Builder configs (select with `tfds.builder('local_text/<config>')`):
  stdlib  (default) the running Python's standard library: the top-level `*.py` files (not
          recursive) of `sysconfig.get_paths()['stdlib']`, sorted. On CPython 3.11.7 that is 168
          files, about 4.9 MB (~4.9M byte tokens); it builds in a few seconds. The corpus depends
          on the Python build, so keep one data_dir per Python version.
  custom  the files matched by the glob in the environment variable `LOCAL_TEXT_FILES` (read when
          the builder is constructed; a directory means every file below it, recursively). A
          prepared `custom` copy is reused as-is whatever the variable says later, so use one
          data_dir per corpus, or prefer the next form.
  custom_<hash>  made by `files_config(glob)` (the LM pipeline's `files` field does this): the
          config name carries a hash of the glob and of each matched file's path, size and modification
          time (`fingerprint`), so different corpora, or one edited, never share a prepared copy.

Features: `text` (str, the file decoded as UTF-8, undecodable bytes replaced by U+FFFD) and `path`
(str, the path relative to the corpus root: the stdlib directory, or the glob's directory prefix).

Splits, by a stable hash of `path` (so adding files never moves others between splits):
  validation  int(sha256(path)[:8], 16) % 50 == 0   (about 2%)
  train       the rest
Stored as ArrayRecord; building and reading need no TensorFlow. Importing this module registers
the builder under the name 'local_text'.
"""
import dataclasses
import glob as globlib
import hashlib
import os
import sysconfig

from etils import epath
import tensorflow_datasets as tfds

ENV_VAR = 'LOCAL_TEXT_FILES'
VALIDATION_EVERY = 50


def stdlib_files() -> list[str]:
  """The default corpus: sorted top-level `*.py` files of the standard library."""
  root = sysconfig.get_paths()['stdlib']
  return sorted(os.path.join(root, f) for f in os.listdir(root)
                if f.endswith('.py') and os.path.isfile(os.path.join(root, f)))


def _glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if globlib.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or ('/' if pattern.startswith(os.sep) else '.')


def resolve(files: str | None) -> tuple[str, list[str]]:
  """(corpus root, sorted file paths) for a glob or directory; `None` is the stdlib corpus."""
  if files is None:
    return sysconfig.get_paths()['stdlib'], stdlib_files()
  files = os.path.expanduser(files)
  if os.path.isdir(files):
    root, pattern = files, os.path.join(files, '**', '*')
  else:
    root, pattern = _glob_root(files), files
  paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
  return root, paths


def fingerprint(files: str) -> str:
  """What names the prepared copy of the files a glob matches: the glob, and each file's path, size and modification
  time, so that editing, adding or removing a file prepares the data again rather than reading a stale copy (which
  stays in the data_dir until deleted)."""
  root, paths = resolve(files)
  digest = hashlib.sha256(os.path.expanduser(files).encode('utf-8'))
  for path in paths:
    stat = os.stat(path)
    digest.update(f'\0{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode('utf-8'))
  return digest.hexdigest()[:10]


def split_of(path: str) -> str:
  """'validation' or 'train' for a corpus-relative path (the documented hash rule)."""
  h = int(hashlib.sha256(path.encode('utf-8')).hexdigest()[:8], 16)
  return 'validation' if h % VALIDATION_EVERY == 0 else 'train'


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """`files`: glob or directory; None = the stdlib corpus; `from_env`: read it from $LOCAL_TEXT_FILES."""
  files: str | None = None
  from_env: bool = False

  def corpus(self) -> tuple[str, list[str]]:
    files = self.files
    if self.from_env:
      files = os.environ.get(ENV_VAR)
      if not files:
        raise ValueError(f'local_text/custom reads its glob from ${ENV_VAR}, which is not set.')
    root, paths = resolve(files)
    if not paths:
      raise ValueError(f'local_text/{self.name}: no files match {files!r}.')
    return root, paths


def files_config(files: str) -> LocalTextConfig:
  """A config for the glob/directory `files`, named `custom_<fingerprint of the files>`."""
  return LocalTextConfig(name=f'custom_{fingerprint(files)}', files=files,
                         description=f'Text files matching {files!r}.')


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files (one example per file); see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: text + path, validation = sha256(path) % 50 == 0.'}
  # As in `digits`: avoids tfds 4.9.10's importlib_resources lookup of the checksums file.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [
      LocalTextConfig(name='stdlib', description='Top-level *.py files of the Python stdlib.'),
      LocalTextConfig(name='custom', from_env=True,
                      description=f'Files matching the glob in ${ENV_VAR}.'),
  ]
  DEFAULT_CONFIG_NAME = 'stdlib'

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    root, paths = self.builder_config.corpus()
    rel = [os.path.relpath(p, root) for p in paths]
    return {s: self._generate_examples(root, [r for r in rel if split_of(r) == s])
            for s in ('train', 'validation')}

  def _generate_examples(self, root, rel_paths):
    for rel in rel_paths:
      with open(os.path.join(root, rel), 'rb') as f:
        text = f.read().decode('utf-8', errors='replace')
      yield rel, {'text': text, 'path': rel}
