"""Batch-level MixUp/CutMix: pairing, per-example lambda, labels that match the pixels."""
import numpy as np
import pytest

from data import mixing


def make_batch(n2=16, h=10, w=12, c=3, seed=0):
  """Example i: pixels in [256 i, 256 i + 255] (no value shared between examples), class i."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (n2, h, w, c)) + 256 * np.arange(n2)[:, None, None, None]
  return {'image': images.astype(np.float32), 'labels': np.eye(n2, dtype=np.float32),
          'label': np.arange(n2, dtype=np.int32)}


def pairs(out):
  """(a, b, lam_a) per output example, read from its labels (two distinct classes)."""
  result = []
  for row in out['labels']:
    a = int(out['label'][len(result)])
    others = [k for k in np.flatnonzero(row) if k != a]
    b = others[0] if others else None
    result.append((a, b, float(row[a])))
  return result


def test_halves_the_batch_and_labels_sum_to_one():
  batch = make_batch()
  out = mixing.mix_batch(batch, np.random.default_rng(0))
  assert out['image'].shape == (8, 10, 12, 3) and out['image'].dtype == np.float32
  assert out['labels'].shape == (8, 16) and out['labels'].dtype == np.float32
  np.testing.assert_allclose(out['labels'].sum(-1), 1.0, rtol=1e-6)
  assert np.all(out['labels'] >= 0)


def test_pairs_follow_the_reference_quarters():
  # Quarters [A|B|C|D] of the 16 inputs -> MixUp(A, B) then CutMix(C, D).
  out = mixing.mix_batch(make_batch(), np.random.default_rng(1))
  np.testing.assert_array_equal(out['label'], [0, 1, 2, 3, 8, 9, 10, 11])
  for i, (a, b, _) in enumerate(pairs(out)):
    assert b == a + 4, i  # MixUp partners are 4 apart, CutMix partners too (8 + j with 12 + j).


def test_mixup_half_is_a_convex_combination_with_the_labels_lambda():
  batch = make_batch()
  for seed in range(5):
    out = mixing.mix_batch(batch, np.random.default_rng(seed))
    lams = []
    for i, (a, b, lam) in enumerate(pairs(out)[:4]):
      np.testing.assert_allclose(out['labels'][i, b], 1 - lam, atol=1e-6)
      want = lam * batch['image'][a] + (1 - lam) * batch['image'][b]
      np.testing.assert_allclose(out['image'][i], want, rtol=1e-5, atol=1e-3)
      lams.append(lam)
    assert len(set(lams)) == 4  # One lambda per example, not per batch.


def test_cutmix_half_pastes_a_box_and_weighs_labels_by_its_area():
  batch = make_batch()
  areas = []
  for seed in range(20):
    out = mixing.mix_batch(batch, np.random.default_rng(seed))
    for i, (a, b, lam) in list(enumerate(pairs(out)))[4:]:
      img = out['image'][i]
      from_a = img == batch['image'][a]
      from_b = img == batch['image'][b]
      assert np.all(from_a ^ from_b)  # Every pixel is copied from exactly one of the two.
      assert np.all(from_a.all(-1) == from_a.any(-1))  # All channels of a pixel from one image.
      from_a = from_a.all(-1)
      ys, xs = np.nonzero(from_a)
      if len(ys):  # `a` fills exactly the rectangle spanned by its pixels.
        assert from_a[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
      assert lam == pytest.approx(from_a.mean(), abs=1e-6)
      b_weight = out['labels'][i, b] if b is not None else 0.0
      assert b_weight == pytest.approx(1 - lam, abs=1e-6)
      areas.append(lam)
  areas = np.array(areas)
  assert areas.min() < 0.1 and areas.max() > 0.6 and len(np.unique(areas)) > 20


def test_one_method_alone_covers_the_whole_output():
  batch = make_batch()
  only_mixup = mixing.mix_batch(batch, np.random.default_rng(0), cutmix_alpha=None)
  only_cutmix = mixing.mix_batch(batch, np.random.default_rng(0), mixup_alpha=0)
  for out in (only_mixup, only_cutmix):  # Halves [A|B] -> (A, B).
    np.testing.assert_array_equal(out['label'], np.arange(8))
    assert all(b in (None, a + 8) for a, b, _ in pairs(out))
  # MixUp pixels are strictly between the two images' value ranges; CutMix pixels copy one of them.
  for i, (a, b, _) in enumerate(pairs(only_cutmix)):
    img = only_cutmix['image'][i]
    assert np.all((img == batch['image'][a]) | (img == batch['image'][a + 8]))
  mixed = only_mixup['image'][0]
  assert np.any((mixed > 255) & (mixed < 8 * 256))


def test_mixup_lambda_follows_beta_alpha_alpha():
  batch = make_batch(n2=400, h=2, w=2, c=1)
  out = mixing.mix_batch(batch, np.random.default_rng(0), mixup_alpha=0.2, cutmix_alpha=None)
  lam = np.array([lam for _, _, lam in pairs(out)])
  assert abs(lam.mean() - 0.5) < 0.06
  assert np.mean((lam < 0.1) | (lam > 0.9)) > 0.5  # U-shaped for alpha 0.2.
  out = mixing.mix_batch(batch, np.random.default_rng(0), mixup_alpha=50.0, cutmix_alpha=None)
  lam = np.array([lam for _, _, lam in pairs(out)])
  assert np.all(np.abs(lam - 0.5) < 0.25)


def test_soft_labels_stay_normalised_and_inputs_are_not_modified():
  batch = make_batch(n2=6)
  smooth = np.full((6, 6), 0.02, np.float32) + np.eye(6, dtype=np.float32) * 0.88
  batch['labels'] = smooth
  before = {k: v.copy() for k, v in batch.items()}
  out = mixing.mix_batch(batch, np.random.default_rng(3))
  assert out['image'].shape[0] == 3  # One MixUp, two CutMix for an odd half.
  np.testing.assert_allclose(out['labels'].sum(-1), 1.0, rtol=1e-6)
  for k in batch:
    np.testing.assert_array_equal(batch[k], before[k])
  again = mixing.mix_batch(batch, np.random.default_rng(3))
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])


@pytest.mark.parametrize('change,match', [
    (lambda b: {**b, 'image': b['image'][:7], 'labels': b['labels'][:7]}, 'even'),
    (lambda b: {k: v for k, v in b.items() if k != 'labels'}, "soft 'labels'"),
    (lambda b: {**b, 'labels': b['label']}, r'labels \[b, classes\]'),
])
def test_bad_batches_raise_one_line_value_errors(change, match):
  with pytest.raises(ValueError, match=match) as e:
    mixing.mix_batch(change(make_batch(n2=8)), np.random.default_rng(0))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='mixup_alpha or cutmix_alpha'):
    mixing.mix_batch(make_batch(n2=8), np.random.default_rng(0), mixup_alpha=0, cutmix_alpha=None)
