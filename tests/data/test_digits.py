"""The offline `digits` TFDS builder: sizes, features and the documented split rule."""
import collections

import numpy as np
import tensorflow_datasets as tfds

from data import digits
from data import pipeline


def test_scaling_maps_0_16_to_0_255_rounding_half_up():
  v = np.arange(17)
  got = digits.scale_to_uint8(v.astype(np.float64))
  np.testing.assert_array_equal(got, np.floor(v * 255 / 16 + 0.5).astype(np.uint8))
  assert got.dtype == np.uint8
  assert (got[0], got[8], got[16]) == (0, 128, 255)
  assert len(np.unique(got)) == 17


def test_builder_info(digits_dir):
  builder = tfds.builder('digits', data_dir=digits_dir)
  assert builder.is_prepared()
  assert str(builder.info.version) == '1.0.0'
  assert builder.info.file_format.value == 'array_record'
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 1437, 'test': 360}
  assert builder.info.features['label'].num_classes == 10


def test_examples_have_declared_dtypes_and_shapes(digits_dir):
  for split, size in [('train', 1437), ('test', 360)]:
    src = pipeline.get_source('digits', split, digits_dir)
    assert len(src) == size
    examples = [src[i] for i in range(len(src))]
    assert all(e['image'].dtype == np.uint8 and e['image'].shape == (8, 8, 1) for e in examples)
    labels = np.array([e['label'] for e in examples])
    assert set(labels.tolist()) == set(range(10))
    assert max(int(e['image'].max()) for e in examples) == 255


def test_split_follows_index_mod_5_rule(digits_dir, sklearn_digits):
  images, labels = sklearn_digits
  idx = np.arange(len(labels))
  for split, want in [('test', idx[idx % 5 == 0]), ('train', idx[idx % 5 != 0])]:
    src = pipeline.get_source('digits', split, digits_dir)
    got = collections.Counter((src[i]['image'].tobytes(), int(src[i]['label']))
                              for i in range(len(src)))
    expected = collections.Counter((images[i].tobytes(), int(labels[i])) for i in want)
    assert got == expected, split
