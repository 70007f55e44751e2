"""RandAugment ops against their stated formulas (and PIL where PIL defines the op), the reference's
magnitude mapping, and the `randaugment` pp op."""
import collections

import numpy as np
from PIL import Image, ImageOps
import pytest

from data import image_ops
from data import randaugment as ra


def rgb(h=12, w=10, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def blend_ref(d, x, f):
  d = d.astype(np.float32)
  return np.floor(np.clip(d + np.float32(f) * (x.astype(np.float32) - d), 0, 255)).astype(np.uint8)


def dot(h, w, y, x, value=255):
  img = np.zeros((h, w, 1), np.uint8)
  img[y, x] = value
  return img


def bright(img):
  return [tuple(p) for p in np.argwhere(img[..., 0] == 255)]


def test_invert_solarize_and_solarize_add():
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  v = img.astype(np.int32)
  np.testing.assert_array_equal(ra.invert(img), 255 - v)
  np.testing.assert_array_equal(ra.solarize(img, 100), np.where(v < 100, v, 255 - v))
  np.testing.assert_array_equal(ra.solarize(img, 0), 255 - v)  # Magnitude 0 inverts everything.
  np.testing.assert_array_equal(ra.solarize(img, 256), img)
  np.testing.assert_array_equal(ra.solarize_add(img, 110),
                                np.where(v < 128, np.minimum(v + 110, 255), v))
  np.testing.assert_array_equal(ra.solarize_add(img, 0), img)
  pil = np.asarray(ImageOps.solarize(Image.fromarray(img[..., 0]), 100))
  np.testing.assert_array_equal(ra.solarize(img, 100)[..., 0], pil)


@pytest.mark.parametrize('bits', range(1, 9))
def test_posterize_keeps_the_top_bits(bits):
  img = rgb()
  want = (img >> (8 - bits)) << (8 - bits)
  np.testing.assert_array_equal(ra.posterize(img, bits), want)
  np.testing.assert_array_equal(ra.posterize(img, bits),
                                np.asarray(ImageOps.posterize(Image.fromarray(img), bits)))


def test_posterize_zero_bits_is_black_and_more_than_8_is_identity():
  img = rgb()
  assert not ra.posterize(img, 0).any()
  np.testing.assert_array_equal(ra.posterize(img, 12), img)


@pytest.mark.parametrize('factor', [0.0, 0.1, 0.55, 1.0, 1.9, 2.8])
def test_brightness_color_contrast_follow_the_blend_formula(factor):
  img = rgb()
  np.testing.assert_array_equal(ra.brightness(img, factor),
                                blend_ref(np.zeros_like(img), img, factor))
  luma = img.astype(np.float32) @ np.array([0.2989, 0.587, 0.114], np.float32)
  grey = np.floor(luma * np.float32(255.5 / 255))[..., None].repeat(3, -1)
  np.testing.assert_array_equal(ra.color(img, factor), blend_ref(grey, img, factor))
  mean = np.floor(grey[..., 0].mean() + 0.5)
  np.testing.assert_array_equal(ra.contrast(img, factor),
                                blend_ref(np.full_like(img, mean), img, factor))


def test_brightness_extrapolation_clips():
  img = np.array([[[10], [100], [200]]], np.uint8)
  np.testing.assert_array_equal(ra.brightness(img, 1.9)[0, :, 0], [19, 190, 255])
  np.testing.assert_array_equal(ra.brightness(img, 0.1)[0, :, 0], [1, 10, 20])


def test_color_is_the_identity_on_grey_images():
  grey = np.random.default_rng(1).integers(0, 256, (6, 7, 1), dtype=np.uint8)
  for factor in (0.1, 0.7, 2.8):
    np.testing.assert_array_equal(ra.color(grey, factor), grey)
    np.testing.assert_array_equal(ra.color(grey.repeat(3, -1), factor), grey.repeat(3, -1))


def test_sharpness_smooths_the_interior_and_keeps_the_border():
  img = rgb(9, 11)
  x = img.astype(np.float32)
  smooth = img.copy()
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
  for y in range(1, 8):
    for xx in range(1, 10):
      window = x[y - 1:y + 2, xx - 1:xx + 2] * kernel[..., None]
      smooth[y, xx] = np.clip(window.sum((0, 1)), 0, 255)
  got = ra.sharpness(img, 0.0)
  np.testing.assert_array_equal(got[0], img[0])
  np.testing.assert_array_equal(got[:, -1], img[:, -1])
  np.testing.assert_allclose(got.astype(int), smooth.astype(int), atol=1)  # Float order of the sum.
  np.testing.assert_array_equal(ra.sharpness(img, 1.3), blend_ref(got, img, 1.3))
  np.testing.assert_array_equal(ra.sharpness(img, 1.0), img)
  tiny = rgb(2, 2)
  np.testing.assert_array_equal(ra.sharpness(tiny, 0.0), tiny)


def test_autocontrast_stretches_each_channel():
  rng = np.random.default_rng(2)
  img = np.stack([rng.integers(50, 101, (8, 8)), np.full((8, 8), 77), rng.integers(0, 256, (8, 8))],
                 -1).astype(np.uint8)
  out = ra.auto_contrast(img)
  for c in (0, 2):
    ch = img[..., c].astype(np.int64)
    lo, hi = ch.min(), ch.max()
    np.testing.assert_array_equal(out[..., c], (ch - lo) * 255 // (hi - lo))
    assert out[..., c].min() == 0 and out[..., c].max() == 255
  np.testing.assert_array_equal(out[..., 1], 77)  # A constant channel is left alone.


def test_equalize_matches_pil_and_flattens_the_histogram():
  rng = np.random.default_rng(3)
  img = np.clip(rng.normal(120, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
  out = ra.equalize(img)
  np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(img))))
  cdf = np.cumsum(np.bincount(out[..., 0].ravel(), minlength=256)) / out[..., 0].size
  levels = np.unique(out[..., 0])
  assert levels.min() == 0 and levels.max() > 240
  np.testing.assert_allclose(cdf[levels[:-1]], (levels[1:]) / 256, atol=0.05)  # Near uniform.
  const = np.full((4, 4, 1), 9, np.uint8)
  np.testing.assert_array_equal(ra.equalize(const), const)


def test_translate_moves_a_bright_pixel_and_fills_with_128():
  img = dot(16, 16, 5, 6)
  out = ra.translate_x(img, 3)
  assert bright(out) == [(5, 3)]
  assert np.all(out[:, 13:] == 128) and not out[:, :13].any(where=out[:, :13] != 255)
  assert bright(ra.translate_x(img, -3)) == [(5, 9)]
  assert np.all(ra.translate_x(img, -3)[:, :3] == 128)
  assert bright(ra.translate_y(img, 2)) == [(3, 6)]
  assert bright(ra.translate_y(img, -4)) == [(9, 6)]
  assert np.all(ra.translate_y(img, -4)[:4] == 128)
  assert np.all(ra.translate_x(img, 100) == 128)  # Translated out of the image.


def test_shear_moves_a_bright_pixel_by_level_times_the_other_coordinate():
  # shear_x: output (x, y) reads (x + level * y, y); the pixel at x = 6, y = 4 lands at x = 6 - 2.
  assert bright(ra.shear_x(dot(12, 12, 4, 6), 0.5)) == [(4, 4)]
  assert bright(ra.shear_x(dot(12, 12, 4, 6), -0.5)) == [(4, 8)]
  assert bright(ra.shear_y(dot(12, 12, 6, 4), 0.5)) == [(4, 4)]
  assert bright(ra.shear_x(dot(12, 12, 0, 6), 0.3)) == [(0, 6)]  # Row 0 is the fixed axis.
  sheared = ra.shear_x(np.zeros((10, 10, 1), np.uint8), 0.3)
  assert np.all(sheared[9, 7:] == 128) and np.all(sheared[0] == 0)  # 0.3 * 9 = 2.7 -> 3 columns.


def test_rotate_quarter_turn_is_exact_and_counter_clockwise():
  img = rgb(9, 9)
  np.testing.assert_array_equal(ra.rotate(img, 90), np.rot90(img, 1))
  np.testing.assert_array_equal(ra.rotate(img, -90), np.rot90(img, -1))
  np.testing.assert_array_equal(ra.rotate(img, 0), img)
  assert bright(ra.rotate(dot(9, 9, 4, 7), 90)) == [(1, 4)]  # Right of centre -> above it.
  out = ra.rotate(np.zeros((15, 15, 3), np.uint8), 45)
  assert np.all(out[0, 0] == 128) and np.all(out[7, 7] == 0)


def test_cutout_fills_the_clipped_square_with_128():
  img = rgb(10, 12)
  out = ra.cutout(img, 2, (5, 6))
  want = img.copy()
  want[3:7, 4:8] = 128
  np.testing.assert_array_equal(out, want)
  out = ra.cutout(img, 3, (0, 11))
  want = img.copy()
  want[0:3, 8:12] = 128
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(ra.cutout(img, 0, (5, 6)), img)


def test_level_to_argument_mapping():
  rng = np.random.default_rng(0)
  args = lambda name, m: ra.op_args(name, m, rng)  # pylint: disable=unnecessary-lambda-assignment
  for m in (0, 5, 10, 15):
    assert args('Posterize', m) == (int(m / 10 * 4),)
    assert args('Solarize', m) == (int(m / 10 * 256),)
    assert args('SolarizeAdd', m) == (int(m / 10 * 110),)
    assert args('Cutout', m) == (int(m / 10 * 40),)
    for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
      assert args(name, m) == pytest.approx((m / 10 * 1.8 + 0.1,))
    for name, top in [('Rotate', 30), ('ShearX', 0.3), ('ShearY', 0.3), ('TranslateX', 100),
                      ('TranslateY', 100)]:
      assert abs(args(name, m)[0]) == pytest.approx(top * m / 10)
    for name in ('AutoContrast', 'Equalize', 'Invert'):
      assert args(name, m) == ()
  assert args('Posterize', 5) == (2,) and args('Color', 5) == (1.0,)
  assert ra.op_args('TranslateX', 10, rng, translate_const=3)[0] in (3.0, -3.0)
  assert ra.op_args('Cutout', 10, rng, cutout_const=2) == (2,)
  signs = [ra.op_args('Rotate', 10, np.random.default_rng(s))[0] > 0 for s in range(400)]
  assert 150 < sum(signs) < 250  # Negated half the time.


@pytest.mark.parametrize('channels', [1, 3])
def test_magnitude_0_geometric_ops_and_magnitude_5_enhance_ops_are_identities(channels):
  img = np.random.default_rng(4).integers(0, 256, (8, 8, channels), dtype=np.uint8)
  for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd'):
    np.testing.assert_array_equal(ra.apply_op(name, img, 0, np.random.default_rng(0)), img, name)
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    np.testing.assert_array_equal(ra.apply_op(name, img, 5, np.random.default_rng(0)), img, name)
    assert not np.array_equal(ra.apply_op(name, img, 0, np.random.default_rng(0)), img) or (
        name == 'Color' and channels == 1)  # Factor 0.1 at magnitude 0: far from the identity.
  solarized = ra.apply_op('Solarize', img, 0, np.random.default_rng(0))
  np.testing.assert_array_equal(solarized, 255 - img)  # Magnitude 0 solarizes everything.


def run(spec, img, seed=0):
  return image_ops.Preprocess(spec)({'image': img}, np.random.default_rng(seed))['image']


def test_zero_layers_is_the_identity_and_the_op_is_deterministic():
  img = rgb(32, 32)
  np.testing.assert_array_equal(run('randaugment(0, 15)', img), img)
  spec = 'randaugment(3, 10, translate_const=8, cutout_const=4)'
  a = [run(spec, img, seed=s) for s in range(6)]
  b = [run(spec, img, seed=s) for s in range(6)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert len({x.tobytes() for x in a}) == 6


def test_each_layer_applies_one_uniformly_chosen_op(monkeypatch):
  counts = collections.Counter()
  def recorder(name):
    def fn(image, *args):
      counts[name] += 1
      return image
    return fn
  monkeypatch.setattr(ra, '_FUNCS', {name: recorder(name) for name in ra.OPS})
  img = rgb(8, 8)
  for s in range(400):
    run('randaugment(4, 9)', img, seed=s)
  assert sum(counts.values()) == 1600  # Always applied: 4 layers x 400 images.
  assert set(counts) == set(ra.OPS) and len(ra.OPS) == 16
  assert all(60 < c < 145 for c in counts.values()), counts  # 100 expected for each.


@pytest.mark.parametrize('shape', [(8, 8, 1), (8, 8, 3), (1, 1, 1), (5, 3, 3)])
def test_every_op_at_every_magnitude_works_on_tiny_images(shape):
  img = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
  before = img.copy()
  for name in ra.OPS:
    for m in (0, 5, 10, 15, 30):
      out = ra.apply_op(name, img, m, np.random.default_rng(m), translate_const=4, cutout_const=2)
      assert out.shape == shape and out.dtype == np.uint8, (name, m)
  np.testing.assert_array_equal(img, before)  # No op writes into its input.
  out = run('randaugment(4, 15)', img)
  assert out.shape == shape and out.dtype == np.uint8


def test_float_input_is_clipped_and_truncated_then_returned_as_float32():
  img = np.array([[[12.7], [-3.0], [300.0], [254.99]]], np.float32)
  out = run('randaugment(0, 10)', img)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[0, :, 0], [12, 0, 255, 254])
  assert run('randaugment(2, 10)', img * 0 + 100).dtype == np.float32


@pytest.mark.parametrize('spec,match', [
    ('randaugment(-1, 10)', 'num_layers'), ('randaugment(2, -1)', 'magnitude'),
    ('randaugment(2.5, 10)', 'num_layers'), ('randaugment(2, 10, translate_const=-1)', 'const')])
def test_bad_arguments_raise_one_line_value_errors(spec, match):
  with pytest.raises(ValueError, match=match) as e:
    image_ops.Preprocess(spec)
  assert '\n' not in str(e.value)


def test_two_channel_images_are_rejected():
  with pytest.raises(ValueError, match='1 or 3 channels'):
    run('randaugment(1, 10)', np.zeros((4, 4, 2), np.uint8))
