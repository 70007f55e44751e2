"""`textures`: a 3-class texture-patch task cut from the photographs that ship inside scikit-image, as a TFDS dataset.

The transfer task of the CPU study: real pixels of another input distribution and another label set than the
digits it pretrains on, with nothing downloaded (scikit-image's wheel holds the photographs).

Source: `skimage/data/{brick,grass,gravel}.png`, one 512x512 grey photograph per class. Each example is a
32x32 crop at a seeded random position. Training and test crops come from disjoint column ranges of each
photograph, so no test pixel was ever seen in training:
  train: crops inside columns [0, 352)    (600 per class, 1,800 examples)
  test:  crops inside columns [384, 512)  (200 per class, 600 examples)
the 32-column gap keeping even neighbouring crops apart. Positions are drawn from numpy's PCG64 seeded with
(split, class), so a rebuild on any machine gives the same bytes.

Features:
  image: uint8 (32, 32, 1), the photograph's grey levels unchanged.
  label: ClassLabel(names=['brick', 'grass', 'gravel']).

Stored as ArrayRecord with a plain `Tensor` feature, so building and reading need no TensorFlow.
Importing this module registers the builder under the name 'textures'.
"""
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

CLASSES = ('brick', 'grass', 'gravel')
CROP = 32
# split -> (first column, end column, crops per class)
REGIONS = {'train': (0, 352, 600), 'test': (384, 512, 200)}


def photograph(name: str) -> np.ndarray:
  """The 512x512 uint8 grey photograph `name` of scikit-image's data directory."""
  from skimage import data  # pylint: disable=g-import-not-at-top  (its import is slow; only when building)
  image = np.asarray(getattr(data, name)())
  if image.shape != (512, 512) or image.dtype != np.uint8:
    raise ValueError(f'skimage.data.{name}() is {image.shape} {image.dtype}, expected (512, 512) uint8; '
                     'install the scikit-image version setup.cfg pins.')
  return image


def crop_corners(split: str, label: int) -> np.ndarray:
  """(row, column) of the top-left corner of every crop of class `label` in `split`, [n, 2]."""
  first, end, count = REGIONS[split]
  rng = np.random.Generator(np.random.PCG64([list(REGIONS).index(split), label]))
  rows = rng.integers(0, 512 - CROP + 1, count)
  columns = rng.integers(first, end - CROP + 1, count)
  return np.stack([rows, columns], axis=1)


class Textures(tfds.core.GeneratorBasedBuilder):
  """Brick, grass and gravel patches (32x32 grey) from scikit-image's photographs; built offline."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = epath.Path(__file__)  # As in data/digits.py: tfds cannot derive it here.
  RELEASE_NOTES = {'1.0.0': 'Initial release: 32x32x1 uint8 crops, train columns [0, 352), test [384, 512).'}

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(CROP, CROP, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(CLASSES)),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-image.org/docs/stable/api/skimage.data.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {s: self._generate_examples(s) for s in REGIONS}

  def _generate_examples(self, split):
    for label, name in enumerate(CLASSES):
      image = photograph(name)
      for i, (r, c) in enumerate(crop_corners(split, label)):
        yield f'{name}_{i}', {'image': image[r:r + CROP, c:c + CROP, None], 'label': label}
