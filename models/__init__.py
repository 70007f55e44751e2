"""Pure Flax Linen model definitions (no training, data or config logic)."""
