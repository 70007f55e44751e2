"""`digits`: the UCI handwritten digits that ship inside scikit-learn, as a TFDS dataset.

Source: `sklearn.datasets.load_digits()` (UCI "Optical Recognition of Handwritten Digits", the
1,797-image test portion; no download). Each image is 8x8 with integer intensities 0..16.

Features:
  image: uint8 (8, 8, 1), v -> (v * 255 + 8) // 16, i.e. v * 255 / 16 rounded half up, so 0 -> 0,
         8 -> 128, 16 -> 255 (all 17 levels stay distinct).
  label: ClassLabel(10), the digit.

Splits (fixed, by position `i` in `load_digits()` order):
  test:  i % 5 == 0  (360 examples)
  train: i % 5 != 0  (1,437 examples)

Stored as ArrayRecord with a plain `Tensor` feature, so building and reading need no TensorFlow.
Importing this module registers the builder under the name 'digits'.
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10


def scale_to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps the 0..16 integer intensities of `load_digits` to 0..255 (rounding half up)."""
  v = np.asarray(images).astype(np.int64)
  return ((v * 255 + 8) // 16).astype(np.uint8)


def split_indices(num_examples: int, split: str) -> np.ndarray:
  """Indices (into `load_digits()` order) that make up `split`."""
  idx = np.arange(num_examples)
  return {'test': idx[idx % 5 == 0], 'train': idx[idx % 5 != 0]}[split]


class Digits(tfds.core.GeneratorBasedBuilder):
  """UCI handwritten digits (8x8) from scikit-learn; built offline."""

  VERSION = tfds.core.Version('1.0.0')
  # tfds 4.9.10 derives this with `importlib_resources`, which it only declares as a dependency
  # for Python < 3.9 (tensorflow/datasets#11212); this builder has no checksums file to locate.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 8x8x1 uint8 images (0..16 scaled to 0..255), '
               'test = index % 5 == 0, train = the rest.',
  }

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images, labels = scale_to_uint8(digits.images)[..., None], digits.target
    for i in split_indices(len(labels), split):
      yield int(i), {'image': images[i], 'label': int(labels[i])}
