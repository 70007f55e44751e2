"""The one training loop shared by every model: mesh sharding, tasks, optimizers, checkpoints, metrics."""

# Exit status of `python -m train` (and train.sweep) stopped by a preemption notice after saving: sysexits'
# EX_TEMPFAIL, so that a restart loop (train.launch's) runs the same command again to resume. Here, not in
# __main__, so that the launcher can import it without defining that CLI's flags.
PREEMPTED_EXIT = 75
