"""Fixtures for the data tests (the prepared digits data_dir, `digits_dir`, is in tests/conftest.py)."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from data import digits


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
