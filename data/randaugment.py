"""RandAugment (Cubuk et al. 2019) on uint8 HWC images: the TF/TPU op set of the NFNet code.

Pure numpy; used through the `randaugment(num_layers, magnitude)` pp op of `image_ops`. Facts taken
from the reference (DeepMind's `nfnets/autoaugment.py`, itself the TF/TPU `autoaugment.py`):

  * 16 ops, in this order: AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, Color,
    Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Cutout, SolarizeAdd.
  * Each of `num_layers` layers picks one op uniformly at random and ALWAYS applies it. (The
    reference also draws a probability uniform in [0.2, 0.8] per op and layer but never uses it:
    it only reaches ops that take a `prob` argument, and none of these do. The paper's RandAugment
    likewise applies every sampled op.)
  * The magnitude M is fixed (not sampled) and maps to arguments through M / 10, where 10 is the
    reference's _MAX_LEVEL; M above 10 extrapolates (NFNets use M = 5, 10 and 15). See `op_args`.
  * Rotate, ShearX/Y and TranslateX/Y negate their argument with probability 1/2.
  * Geometric ops sample the source with nearest-neighbour interpolation and fill pixels that come
    from outside the image with 128 in every channel; Cutout fills with 128 too.
  * Translation and Cutout sizes are in pixels (100 and 40 at M = 10): `translate_const` and
    `cutout_const` scale them, e.g. for tiny images.

Quirks of the reference that are kept: Posterize keeps int(M / 10 * 4) bits, so a LARGER magnitude
posterizes LESS (M = 0 gives a black image); Solarize inverts pixels >= int(M / 10 * 256), so M = 0
inverts everything and M >= 10 changes nothing; the enhance ops (Color, Contrast, Brightness,
Sharpness) use factor M / 10 * 1.8 + 0.1, the identity at M = 5, not at M = 0.
One deliberate difference: the reference's Contrast blends towards (number of pixels / 256), as it
averages a histogram instead of the pixels (a bug that makes it depend on the resolution); here it
blends towards the mean grey level, as PIL's ImageEnhance.Contrast does and the reference intended.

Images are HWC with 1 or 3 channels; on 1 channel the grey level is the channel (Color is then the
identity). Every op keeps the shape, returns uint8 and does not modify its input.
"""
from collections.abc import Callable
import functools

import numpy as np

MAX_LEVEL = 10.0
FILL = 128
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
       'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
       'SolarizeAdd')


def as_uint8(image) -> np.ndarray:
  """uint8 as is; other dtypes are clipped to [0, 255] and truncated (the reference's cast)."""
  img = np.asarray(image)
  if img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f'RandAugment needs an HWC image with 1 or 3 channels, got shape {img.shape}.')
  if img.dtype == np.uint8:
    return img
  return np.clip(img, 0, 255).astype(np.uint8)


def blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  """floor(clip(d + factor * (x - d), 0, 255)) in float32; factor 0 gives d, 1 gives x exactly."""
  if factor == 0.0:
    return degenerate
  if factor == 1.0:
    return image
  d = degenerate.astype(np.float32)
  out = d + np.float32(factor) * (image.astype(np.float32) - d)
  return np.clip(out, 0.0, 255.0).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
  """[h, w, 1] uint8: floor(255.5 / 255 * (0.2989 R + 0.5870 G + 0.1140 B)), as tf.image's
  rgb_to_grayscale rounds; a 1-channel image is its own grey level."""
  if image.shape[-1] == 1:
    return image
  luma = image.astype(np.float32) @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  return np.floor(luma * np.float32(255.5 / 255.0)).astype(np.uint8)[..., None]


# Colour ops.

def auto_contrast(image: np.ndarray) -> np.ndarray:
  """Per channel with lo = min < hi = max: floor((x - lo) * 255 / (hi - lo)); constant channels
  are unchanged."""
  out = np.empty_like(image)
  levels = np.arange(256)
  for c in range(image.shape[-1]):
    ch = image[..., c]
    lo, hi = int(ch.min()), int(ch.max())
    if hi > lo:  # A lookup table: exact integer arithmetic, and fast.
      ch = np.clip((levels - lo) * 255 // (hi - lo), 0, 255).astype(np.uint8)[ch]
    out[..., c] = ch
  return out


def _equalize_channel(ch: np.ndarray) -> np.ndarray:
  hist = np.bincount(ch.ravel(), minlength=256)
  nonzero = hist[hist > 0]
  step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
  if step == 0:
    return ch
  lut = (np.cumsum(hist) + step // 2) // step
  lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
  return lut[ch]


def equalize(image: np.ndarray) -> np.ndarray:
  """PIL's ImageOps.equalize per channel: with the 256-bin histogram h and the count n_last of the
  highest occupied level, step = (sum(h) - n_last) // 255; x -> (step // 2 + sum(h[:x])) // step,
  clipped to 255; the channel is unchanged when step is 0."""
  return np.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def invert(image: np.ndarray) -> np.ndarray:
  """255 - x."""
  return 255 - image


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top `bits` bits (clamped to 0..8): (x >> (8 - bits)) << (8 - bits); 0 bits -> 0."""
  shift = 8 - min(max(int(bits), 0), 8)
  return ((image.astype(np.int32) >> shift) << shift).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """x if x < threshold else 255 - x."""
  return np.where(image < threshold, image, 255 - image)


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
  """clip(x + addition, 0, 255) if x < threshold else x."""
  added = np.clip(image.astype(np.int32) + int(addition), 0, 255).astype(np.uint8)
  return np.where(image < threshold, added, image)


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """blend(grey, x, factor) with the grey level in every channel (identity on 1 channel)."""
  return blend(np.repeat(grayscale(image), image.shape[-1], axis=-1), image, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """blend(m, x, factor) with m = floor(mean grey level + 0.5) everywhere (PIL's Contrast)."""
  mean = np.floor(grayscale(image).mean(dtype=np.float64) + 0.5)
  return blend(np.full(image.shape, mean, np.uint8), image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """blend(0, x, factor) = floor(clip(factor * x, 0, 255))."""
  return blend(np.zeros_like(image), image, factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """blend(s, x, factor), s = x smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (truncated to
  uint8) inside, x on the one-pixel border (and everywhere on images under 3x3)."""
  h, w = image.shape[:2]
  smooth = image.copy()
  if h >= 3 and w >= 3:
    x = image.astype(np.float32)
    acc = 4.0 * x[1:-1, 1:-1]  # The centre's weight 5 is 1 from the 3x3 sum below plus 4.
    for dy in range(3):
      for dx in range(3):
        acc = acc + x[dy:dy + h - 2, dx:dx + w - 2]
    smooth[1:-1, 1:-1] = np.clip(acc / np.float32(13.0), 0, 255).astype(np.uint8)
  return blend(smooth, image, factor)


# Geometric ops: out[y, x] = image[round(src_y), round(src_x)], or FILL where that lies outside.

def _round_half_away(v: np.ndarray) -> np.ndarray:
  return np.trunc(v + np.copysign(0.5, v)).astype(np.int64)


def _resample(image: np.ndarray, src_x: np.ndarray, src_y: np.ndarray) -> np.ndarray:
  h, w = image.shape[:2]
  xi, yi = _round_half_away(src_x), _round_half_away(src_y)
  inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
  flat = np.where(inside, yi * w + xi, 0).ravel()
  out = np.take(image.reshape(h * w, -1), flat, axis=0).reshape(image.shape)
  out[~inside] = FILL
  return out


@functools.lru_cache(maxsize=16)
def _cached_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  ys, xs = np.mgrid[:h, :w].astype(np.float64)
  xs.flags.writeable = ys.flags.writeable = False  # Shared across threads through the cache.
  return xs, ys


def _grid(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pixel coordinates (x, y), each [h, w] float64."""
  return _cached_grid(*image.shape[:2])


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Rotation about c = ((w - 1) / 2, (h - 1) / 2): with t = radians(degrees), output (x, y) reads
  src_x = cx + cos t (x - cx) - sin t (y - cy), src_y = cy + sin t (x - cx) + cos t (y - cy)
  (counter-clockwise on screen for t > 0)."""
  x, y = _grid(image)
  cx, cy = (image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2
  t = np.deg2rad(degrees)
  return _resample(image, cx + np.cos(t) * (x - cx) - np.sin(t) * (y - cy),
                   cy + np.sin(t) * (x - cx) + np.cos(t) * (y - cy))


def shear_x(image: np.ndarray, level: float) -> np.ndarray:
  """Output (x, y) reads (x + level * y, y): row y shifts left by level * y pixels."""
  x, y = _grid(image)
  return _resample(image, x + level * y, y)


def shear_y(image: np.ndarray, level: float) -> np.ndarray:
  """Output (x, y) reads (x, y + level * x): column x shifts up by level * x pixels."""
  x, y = _grid(image)
  return _resample(image, x, y + level * x)


def translate_x(image: np.ndarray, pixels: float) -> np.ndarray:
  """Output (x, y) reads (x + pixels, y): the content moves LEFT by `pixels`."""
  x, y = _grid(image)
  return _resample(image, x + pixels, y)


def translate_y(image: np.ndarray, pixels: float) -> np.ndarray:
  """Output (x, y) reads (x, y + pixels): the content moves UP by `pixels`."""
  x, y = _grid(image)
  return _resample(image, x, y + pixels)


def cutout(image: np.ndarray, pad_size: int, center: tuple[int, int]) -> np.ndarray:
  """Fills rows [max(0, cy - pad), min(h, cy + pad)) x columns [max(0, cx - pad), min(w, cx + pad))
  with FILL, for center = (cy, cx); pad_size 0 changes nothing."""
  cy, cx = center
  h, w = image.shape[:2]
  out = image.copy()
  rows = slice(max(0, cy - pad_size), min(h, cy + pad_size))
  out[rows, max(0, cx - pad_size):min(w, cx + pad_size)] = FILL
  return out


_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert, 'Rotate': rotate,
    'Posterize': posterize, 'Solarize': solarize, 'Color': color, 'Contrast': contrast,
    'Brightness': brightness, 'Sharpness': sharpness, 'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateX': translate_x, 'TranslateY': translate_y, 'Cutout': cutout,
    'SolarizeAdd': solarize_add,
}
_SIGNED = {'Rotate': 30.0, 'ShearX': 0.3, 'ShearY': 0.3}  # Maximum argument at level 10.


def op_args(name: str, magnitude: float, rng: np.random.Generator, translate_const: float = 100.0,
            cutout_const: float = 40.0) -> tuple:
  """The reference's level -> arguments, with m = magnitude / 10 (and s = +-1 with probability 1/2):

    Rotate s * 30m degrees; ShearX/Y s * 0.3m; TranslateX/Y s * translate_const * m pixels;
    Posterize int(4m) bits; Solarize threshold int(256m); SolarizeAdd addition int(110m);
    Color, Contrast, Brightness, Sharpness factor 1.8m + 0.1; Cutout pad_size int(cutout_const * m)
    (a square of side up to 2 * pad_size); AutoContrast, Equalize, Invert take none.
  """
  m = magnitude / MAX_LEVEL
  sign = lambda v: -v if rng.random() < 0.5 else v  # pylint: disable=unnecessary-lambda-assignment
  if name in _SIGNED:
    return (sign(_SIGNED[name] * m),)
  if name in ('TranslateX', 'TranslateY'):
    return (sign(translate_const * m),)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (m * 1.8 + 0.1,)
  return {'Posterize': (int(m * 4),), 'Solarize': (int(m * 256),), 'SolarizeAdd': (int(m * 110),),
          'Cutout': (int(m * cutout_const),)}.get(name, ())


def apply_op(name: str, image: np.ndarray, magnitude: float, rng: np.random.Generator,
             translate_const: float = 100.0, cutout_const: float = 40.0) -> np.ndarray:
  """Applies op `name` at `magnitude` to a uint8 HWC image (Cutout's centre uniform over pixels)."""
  args = op_args(name, magnitude, rng, translate_const, cutout_const)
  if name == 'Cutout':
    args += ((int(rng.integers(image.shape[0])), int(rng.integers(image.shape[1]))),)
  return _FUNCS[name](image, *args)


def distort(image, num_layers: int, magnitude: float, rng: np.random.Generator,
            translate_const: float = 100.0, cutout_const: float = 40.0) -> np.ndarray:
  """`num_layers` ops, each chosen uniformly from OPS and always applied; returns uint8."""
  img = as_uint8(image)
  for _ in range(num_layers):
    name = OPS[int(rng.integers(len(OPS)))]
    img = apply_op(name, img, magnitude, rng, translate_const, cutout_const)
  return img
