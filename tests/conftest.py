"""Shared test setup: 8 CPU devices for sharding tests, float32 matmuls, and the digits data built once."""
import os

# Must happen before jax initialises its backends.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from data import pipeline  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """A TFDS data_dir holding the prepared `digits` dataset (built on first use, offline)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  pipeline.get_source('digits', 'train', data_dir)
  return data_dir
