"""Fixtures for the data tests (the prepared digits data_dir, `digits_dir`, is in tests/conftest.py)."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.datasets import load_digits

from data import digits
from data import pipeline
from data import text


@pytest.fixture(scope='session')
def sklearn_digits():
  """(uint8 images [1797, 8, 8, 1] scaled like the builder, int labels [1797])."""
  d = load_digits()
  return digits.scale_to_uint8(d.images)[..., None], d.target


@pytest.fixture(scope='session')
def image_to_index(sklearn_digits):
  """Maps an image's bytes to its position in `load_digits()` (all 1,797 images are distinct)."""
  images, _ = sklearn_digits
  table = {img.tobytes(): i for i, img in enumerate(images)}
  assert len(table) == len(images)
  return lambda img: table[np.asarray(img).astype(np.uint8).tobytes()]


NUM_FILES = 150


def write_corpus(root, n=NUM_FILES):
  """n small files in two subdirectories, each with distinct (partly non-ASCII) content."""
  paths = []
  for i in range(n):
    sub = root / ('a' if i % 2 else 'b')
    sub.mkdir(parents=True, exist_ok=True)
    p = sub / f'doc{i:03d}.txt'
    p.write_text(f'document {i}\n' + 'héllo wörld → 🙂 ' * (i % 7) + f'\nend {i}\n', 'utf-8')
    paths.append(p)
  (root / 'a' / 'skip.bin').write_bytes(b'\xff\xfe not matched by *.txt')
  return paths


@pytest.fixture(scope='session')
def text_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  write_corpus(root)
  return root


@pytest.fixture(scope='session')
def text_dir(tmp_path_factory, text_corpus):
  """A data_dir with the corpus `text_corpus/**/*.txt` prepared (config `custom_<hash>`)."""
  data_dir = str(tmp_path_factory.mktemp('tfds_text'))
  pipeline.get_source('local_text', 'train', data_dir,
                      builder_config=text.files_config(str(text_corpus / '**' / '*.txt')))
  return data_dir


@pytest.fixture
def run_without_tensorflow(tmp_path):
  """Runs a Python snippet in a subprocess where `import tensorflow` is recorded and fails.

  A stand-in `tensorflow` package is importable but leaves a marker file and raises, so the snippet proves
  the code path never imports TensorFlow even on machines where it is installed.
  """
  repo = pathlib.Path(__file__).resolve().parents[2]
  fake = tmp_path / 'fake' / 'tensorflow'
  fake.mkdir(parents=True)
  marker = tmp_path / 'imported'
  (fake / '__init__.py').write_text(
      f'open({str(marker)!r}, "w").close()\nraise ImportError("tensorflow must not be imported")\n')

  def run(snippet: str) -> None:
    script = textwrap.dedent(snippet) + "\nassert 'tensorflow' not in sys.modules\n"
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(fake.parent), str(repo)])}
    proc = subprocess.run([sys.executable, '-c', 'import sys\n' + script], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()

  return run
