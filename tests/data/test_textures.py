"""The offline `textures` TFDS builder: sizes, features, the crops' provenance and the disjoint regions."""
import collections

import numpy as np
from skimage import data as skdata
import tensorflow_datasets as tfds

from data import pipeline
from data import textures


def test_builder_info_and_sizes(digits_dir):
  src = pipeline.get_source('textures', 'train', digits_dir)  # Prepared on first use, offline.
  builder = tfds.builder('textures', data_dir=digits_dir)
  assert builder.info.file_format.value == 'array_record'
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {'train': 1800, 'test': 600}
  assert builder.info.features['label'].names == ['brick', 'grass', 'gravel']
  example = src[0]
  assert example['image'].shape == (32, 32, 1) and example['image'].dtype == np.uint8


def test_every_crop_is_a_patch_of_its_photograph_inside_its_split_region(digits_dir):
  """Found again by brute force in the photograph read through scikit-image's own API: each crop lies wholly in
  its split's column range, and train and test never share a pixel column."""
  photos = [getattr(skdata, name)() for name in ('brick', 'grass', 'gravel')]
  columns = {}
  for split, (first, end, per_class) in {'train': (0, 352, 600), 'test': (384, 512, 200)}.items():
    src = pipeline.get_source('textures', split, digits_dir)
    labels = collections.Counter(int(src[i]['label']) for i in range(len(src)))
    assert labels == {0: per_class, 1: per_class, 2: per_class}
    used = set()
    for i in range(0, len(src), 97):  # A sample: the search is exhaustive per crop.
      ex = src[i]
      photo, patch = photos[int(ex['label'])], ex['image'][..., 0]
      windows = np.lib.stride_tricks.sliding_window_view(photo, patch.shape)
      hits = np.argwhere((windows == patch).all(axis=(2, 3)))
      assert len(hits), f'{split} example {i} is not a patch of its class photograph'
      r, c = hits[0]
      assert first <= c and c + 32 <= end, (split, c)
      used.update(range(c, c + 32))
    columns[split] = used
  assert not columns['train'] & columns['test']

