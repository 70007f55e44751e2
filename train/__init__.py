"""The one training loop shared by every model: mesh sharding, tasks, optimizers, checkpoints, metrics."""
