"""Data: tfds builders (digits), grain pipelines, pp ops (image_ops, randaugment) and batch mixing."""
