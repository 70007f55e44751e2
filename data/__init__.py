"""Data: tfds builders (digits, textures, local text), grain pipelines, pp ops (image_ops, randaugment) and batch
mixing."""
