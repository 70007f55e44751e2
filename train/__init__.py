"""The one training loop shared by every model: mesh sharding, objectives, adapters, optimizers, checkpoints.

The compute-budget study (sweep, analysis, scaling fits) lives in train/study/, the tools (pod launcher,
weight import/export, run loading, sampling) in train/tools/; `python -m train.NAME` runs each through
train/NAME.py. The runtime here imports neither (tests/test_layering.py).
"""

# Exit status of `python -m train` (and train.sweep) stopped by a preemption notice after saving, so that a
# restart loop (train.launch's) runs the same command again to resume; defined with the other exit statuses
# in train/cli.py, and importable here without defining any command's flags.
from train.cli import PREEMPTED_EXIT  # noqa: F401
