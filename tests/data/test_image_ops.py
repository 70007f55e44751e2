"""Preprocessing ops and pp-string parsing, checked against direct numpy expectations."""
import io
import pickle

import numpy as np
from PIL import Image
import pytest

from data import image_ops


def run(spec, example, seed=0):
  return image_ops.Preprocess(spec)(example, np.random.default_rng(seed))


def ramp(h, w, a=2.0, b=3.0, c=1.0):
  """Float image with value a * x + b * y + c at pixel (y, x), shape (h, w, 1)."""
  y, x = np.mgrid[:h, :w].astype(np.float32)
  return (a * x + b * y + c)[..., None]


def test_value_range_arithmetic():
  img = np.array([[[0], [51], [255]]], np.uint8)
  out = run('value_range(-1, 1)', {'image': img})['image']
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, :, 0], [-1.0, -0.6, 1.0], atol=1e-6)
  out = run('value_range(0, 10, in_lo=5, in_hi=15)', {'image': np.array([0.0, 5.0, 20.0])})
  np.testing.assert_allclose(out['image'], [-5.0, 0.0, 15.0], atol=1e-5)
  out = run('value_range(0, 10, 5, 15, clip=True)', {'image': np.array([0.0, 5.0, 20.0])})
  np.testing.assert_allclose(out['image'], [0.0, 0.0, 10.0], atol=1e-5)


def test_flip_lr_mirrors_about_half_the_time_and_follows_the_rng():
  img = np.arange(2 * 3 * 2).reshape(2, 3, 2)
  outs = [run('flip_lr', {'image': img}, seed=s)['image'] for s in range(400)]
  flipped = [np.array_equal(o, img[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, img) for f, o in zip(flipped, outs))
  assert 150 < sum(flipped) < 250
  assert [np.array_equal(run('flip_lr', {'image': img}, seed=s)['image'], img[:, ::-1])
          for s in range(400)] == flipped


def test_central_crop():
  img = np.arange(5 * 6 * 3).reshape(5, 6, 3)
  np.testing.assert_array_equal(run('central_crop((3, 2))', {'image': img})['image'],
                                img[1:4, 2:4])
  np.testing.assert_array_equal(run('central_crop(4)', {'image': img})['image'], img[0:4, 1:5])
  with pytest.raises(ValueError, match='Cannot crop'):
    run('central_crop(6)', {'image': img})


def test_random_crop_returns_windows_at_every_position():
  img = np.arange(4 * 5).reshape(4, 5, 1)
  corners = set()
  for s in range(200):
    out = run('random_crop((2, 3))', {'image': img}, seed=s)['image']
    top, left = divmod(int(out[0, 0, 0]), 5)
    np.testing.assert_array_equal(out, img[top:top + 2, left:left + 3])
    corners.add((top, left))
  assert corners == {(t, l) for t in range(3) for l in range(3)}


@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('size', [(3, 5), (16, 16), (2, 40)])
def test_resize_keeps_a_constant_image(size, antialias):
  img = np.full((7, 9, 3), 200, np.uint8)
  out = image_ops.resize_image(img, size, antialias)
  assert out.dtype == np.uint8 and out.shape == (*size, 3)
  assert np.all(out == 200)


def test_bilinear_upsampling_of_a_linear_image_is_linear_with_clamped_edges():
  out = run('resize((8, 12))', {'image': ramp(4, 6)})['image']
  # Output pixel i samples input coordinate (i + 0.5) * in / out - 0.5, clamped to the image.
  ys = np.clip((np.arange(8) + 0.5) * 4 / 8 - 0.5, 0, 3)
  xs = np.clip((np.arange(12) + 0.5) * 6 / 12 - 0.5, 0, 5)
  np.testing.assert_allclose(out[..., 0], 2 * xs[None, :] + 3 * ys[:, None] + 1, atol=1e-5)


def test_halving_averages_2x2_blocks():
  img = np.random.default_rng(0).uniform(size=(6, 8, 2)).astype(np.float32)
  want = img.reshape(3, 2, 4, 2, 2).mean(axis=(1, 3))
  np.testing.assert_allclose(image_ops.resize_image(img, (3, 4)), want, atol=1e-6)


def test_antialias_averages_over_the_whole_footprint_when_shrinking():
  # Stripes 1,0,0,1 along x, shrunk 4x: each output pixel samples x = 4i + 1.5, between two zeros,
  # so plain bilinear sees only zeros while the 4x wider filter averages the stripes to 0.5.
  stripes = np.tile(np.array([1, 0, 0, 1], np.float32), 8)[None, :, None].repeat(4, axis=0)
  plain = image_ops.resize_image(stripes, (4, 8))
  smooth = image_ops.resize_image(stripes, (4, 8), antialias=True)
  np.testing.assert_allclose(plain, 0.0, atol=1e-6)
  np.testing.assert_allclose(smooth[:, 1:-1], 0.5, atol=1e-6)


@pytest.mark.parametrize('size,out', [((37, 50), (16, 21)), ((30, 40), (7, 9)), ((8, 8), (16, 12))])
def test_antialiased_resize_matches_pil_bilinear(size, out):
  # PIL's BILINEAR filter is the same triangle, widened when shrinking: an independent reference.
  img = np.random.default_rng(0).uniform(0, 255, size).astype(np.float32)
  want = np.asarray(Image.fromarray(img).resize(out[::-1], Image.Resampling.BILINEAR))
  got = image_ops.resize_image(img[..., None], out, antialias=True)[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_resize_small_sets_the_shorter_side():
  img = np.zeros((10, 25, 3), np.uint8)
  assert run('resize_small(4)', {'image': img})['image'].shape == (4, 10, 3)
  assert run('resize_small(20)', {'image': img.transpose(1, 0, 2)})['image'].shape == (50, 20, 3)


def test_onehot_and_label_smoothing():
  out = run('onehot(10)', {'label': np.int64(3)})
  np.testing.assert_array_equal(out['labels'], np.eye(10, dtype=np.float32)[3])
  assert out['label'] == 3 and out['labels'].dtype == np.float32
  eps = 0.1
  smooth = run(f'onehot(4, on={1 - eps + eps / 4}, off={eps / 4}, key_result="y")', {'label': 2})
  np.testing.assert_allclose(smooth['y'], [0.025, 0.025, 0.925, 0.025])
  np.testing.assert_allclose(smooth['y'].sum(), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(run('onehot(5)', {'label': [0, 3]})['labels'], [1, 0, 0, 1, 0])
  with pytest.raises(ValueError, match='outside'):
    run('onehot(5)', {'label': 5})


def test_keep():
  ex = {'image': 1, 'label': 2, 'id': 3}
  assert run('keep("image", "label")', ex) == {'image': 1, 'label': 2}
  with pytest.raises(KeyError, match='labels'):
    run('keep("labels")', ex)


def test_decode_png_bytes_and_passes_arrays_through():
  img = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  np.testing.assert_array_equal(run('decode', {'image': buf.getvalue()})['image'], img)
  gray = run('decode(channels=1)', {'image': buf.getvalue()})['image']
  assert gray.shape == (5, 4, 1) and gray.dtype == np.uint8
  assert run('decode', {'image': np.zeros((5, 4))})['image'].shape == (5, 4, 1)


def test_ops_do_not_mutate_their_input():
  ex = {'image': np.arange(16, dtype=np.uint8).reshape(4, 4, 1), 'label': 1}
  before = ex['image'].copy()
  run('flip_lr|random_crop(3)|resize(8)|value_range(-1, 1)|onehot(2)|keep("image")', ex)
  assert sorted(ex) == ['image', 'label']
  np.testing.assert_array_equal(ex['image'], before)


def test_parsing_accepts_positional_keyword_and_bare_ops():
  img = np.zeros((8, 8, 1), np.uint8)
  for spec in ['resize(4)', 'resize((4, 4))', 'resize(size=[4, 4])', ' resize( 4 , key="image" ) ']:
    assert run(spec, {'image': img})['image'].shape == (4, 4, 1), spec
  assert run('flip_lr|flip_lr()', {'image': img})['image'].shape == (8, 8, 1)
  assert run('', {'image': img})['image'] is img


@pytest.mark.parametrize('spec,match', [
    ('no_such_op(3)', "Unknown pp op 'no_such_op'.*known ops: .*central_crop, decode"),
    ('resize(4)|Resize(4)', "Unknown pp op 'Resize'"),
    ('value_range(-1)', r"Bad arguments for pp op 'value_range\(-1\)'.*usage: value_range\(lo, hi"),
    ('resize("big")', r"Bad arguments for pp op 'resize\(\"big\"\)'.*size must be"),
    ('resize(4, bogus=1)', r"Bad arguments .*bogus"),
    ('decode(channels=2)', r"Bad arguments .*channels must be 1 or 3"),
    ('resize(x)', r"Cannot parse pp op 'resize\(x\)'"),
    ('resize(4', r"Cannot parse pp op 'resize\(4'"),
])
def test_bad_pp_strings_raise_one_line_value_errors(spec, match):
  with pytest.raises(ValueError, match=match) as e:
    image_ops.Preprocess(spec)
  assert '\n' not in str(e.value)


def test_registering_an_op_makes_it_available_and_picklable():
  @image_ops.register
  def add_const(c, key='image'):
    return lambda ex, rng: {**ex, key: ex[key] + c}
  try:
    pp = pickle.loads(pickle.dumps(image_ops.Preprocess('add_const(2)|add_const(c=3)')))
    assert pp({'image': np.ones(2)}, np.random.default_rng(0))['image'].tolist() == [6, 6]
    assert 'add_const' in image_ops.known_ops()
  finally:
    del image_ops._OPS['add_const']  # pylint: disable=protected-access


def crop_boxes(n, h=120, w=160, seed=0, **kw):
  rng = np.random.default_rng(seed)
  return np.array([image_ops.inception_crop_box(h, w, rng, **kw) for _ in range(n)])


def test_inception_crop_boxes_respect_area_aspect_and_image_bounds():
  boxes = crop_boxes(3000)
  top, left, h, w = boxes.T
  area, aspect = h * w / (120 * 160), w / h
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 120) & (left + w <= 160))
  # min_object_covered=0.1 (the reference's) raises the 0.08 area floor to 0.1.
  assert area.min() >= 0.1 and area.max() <= 1.0
  assert area.min() < 0.12 and area.max() > 0.9
  # w = rint(a * h) with a in [3/4, 4/3]: the ratio is off by at most 0.5 / h.
  assert np.all(aspect >= 0.75 - 0.5 / h) and np.all(aspect <= 4 / 3 + 0.5 / h)
  assert aspect.min() < 0.77 and aspect.max() > 1.31
  # TF draws the aspect ratio uniformly: P(a < 1) = 0.25 / (4/3 - 3/4) = 0.43 (log-uniform: 0.5).
  assert 0.37 < np.mean(aspect < 1) < 0.47
  # Offsets are uniform in [0, H - h): a crop narrower than the image never touches the right edge.
  assert np.all((left + w < 160) | (w == 160)) and np.any(left + w == 159)
  low = crop_boxes(3000, min_object_covered=0.0)
  assert 0.08 <= (low[:, 2] * low[:, 3]).min() / (120 * 160) < 0.09


def test_inception_crop_is_the_resized_sampled_box_and_follows_the_rng():
  img = np.random.default_rng(0).uniform(0, 255, (40, 60, 3)).astype(np.float32)
  for seed in range(20):
    out = run('inception_crop((16, 24), fallback_pad=0)', {'image': img}, seed=seed)['image']
    top, left, h, w = image_ops.inception_crop_box(40, 60, np.random.default_rng(seed))
    assert out.shape == (16, 24, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(
        out, image_ops.resize_image(img[top:top + h, left:left + w], (16, 24)))
    np.testing.assert_array_equal(
        out, run('inception_crop((16, 24), fallback_pad=0)', {'image': img}, seed=seed)['image'])
  digit = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
  outs = [run('inception_crop(8, fallback_pad=0)', {'image': digit}, seed=s)['image']
          for s in range(50)]
  assert all(o.shape == (8, 8, 1) and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) > 25  # 8x8 has few distinct crops.


def test_inception_crop_falls_back_to_the_padded_central_crop():
  img = np.random.default_rng(0).uniform(0, 255, (64, 64, 1)).astype(np.float32)
  # Aspect 4 with at least 90% of a square image's area cannot fit: every attempt fails.
  assert image_ops.inception_crop_box(64, 64, np.random.default_rng(0), area_min=0.9,
                                      aspect_min=4.0, aspect_max=4.0) is None
  out = run('inception_crop(16, area_min=0.9, aspect_min=4.0, aspect_max=4.0, fallback_pad=16)',
            {'image': img})['image']
  # s = 64 / (16 + 16) = 2: the central 32x32, as the reference's eval crop would take.
  np.testing.assert_array_equal(out, image_ops.resize_image(img[16:48, 16:48], 16))
  assert image_ops.padded_central_box(256, 320, 224, 32) == (16, 48, 224, 224)
  assert image_ops.padded_central_box(8, 8, 8, 0) == (0, 0, 8, 8)
  assert image_ops.padded_central_box(8, 8, 8, 32) == (4, 4, 1, 1)


def test_eval_squash_resize_then_central_crop_compose():
  img = np.random.default_rng(0).uniform(0, 255, (50, 70, 3)).astype(np.float32)
  out = run('resize(40)|central_crop(32)', {'image': img})['image']  # S + 32 squash, centre S.
  np.testing.assert_array_equal(out, image_ops.resize_image(img, 40)[4:36, 4:36])


def test_standardize():
  img = np.array([[[10, 20, 30]]], np.uint8)
  out = run('standardize((1.0, 2.0, 3.0), (3.0, 6.0, 9.0))', {'image': img})['image']
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [3.0, 3.0, 3.0])
  np.testing.assert_allclose(run('standardize(5, 5)', {'image': img})['image'][0, 0], [1, 3, 5])


@pytest.mark.parametrize('spec', [
    'inception_crop(8, area_min=0.5, area_max=0.4)', 'inception_crop(8, aspect_min=0)',
    'inception_crop(8, max_attempts=0)', 'standardize(0, 0)'])
def test_bad_crop_and_standardize_arguments_raise_one_line_value_errors(spec):
  with pytest.raises(ValueError, match='Bad arguments') as e:
    image_ops.Preprocess(spec)
  assert '\n' not in str(e.value)
