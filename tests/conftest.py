"""Shared test setup: 8 CPU devices for sharding tests, float32 matmuls, shared fixtures."""
import os

# Must happen before jax initialises its backends.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
