"""Workdirs that are local directories or gs:// URLs (every multi-host run's), read and written through etils.epath.

Paths stay strings joined with os.path.join (posixpath, which leaves gs://b/x/name intact); the file I/O goes
through `epath.Path`, which reaches GCS with gcsfs (`pip install -e '.[tpu]'`) or TensorFlow's gfile.
"""
import glob as glob_lib
import os
import re

from etils import epath

_MAGIC = re.compile(r'[*?[]')


def is_url(path) -> bool:
  """gs://bucket/dir (any scheme://): a path that os.path functions other than join do not understand."""
  return '://' in os.fspath(path)


def absolute(path) -> str:
  """A local path made absolute (immune to a later chdir); a URL as it is (abspath would give $PWD/gs:/b/x)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def split_glob(pattern: str) -> tuple[str, str]:
  """('gs://b/study', 'run*/x') of 'gs://b/study/run*/x': the fixed directory and the pattern under it."""
  scheme, sep, rest = pattern.partition('://')
  parts = rest.split('/')
  fixed = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
  return scheme + sep + '/'.join(parts[:fixed]), '/'.join(parts[fixed:])


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern: local ones as glob.glob gives them (~ expanded), URLs through epath."""
  if not is_url(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  root, rest = split_glob(pattern)
  if not rest:
    return [pattern] if epath.Path(pattern).exists() else []
  return sorted(str(p) for p in epath.Path(root).glob(rest))

