"""Per-example preprocessing ops, addressed by name in big_vision-style pp strings.

A pp string chains ops with '|', e.g. 'resize(16)|flip_lr|value_range(-1, 1)|keep("image", "label")'.
Arguments are Python literals (parsed with `ast.literal_eval`), positional or keyword; an op without
arguments may omit the parentheses. Arguments must not contain '|'.

Every op is a factory `op(*args, **kw) -> fn(example: dict, rng: np.random.Generator) -> dict`.
`fn` must not mutate its input dict and must draw all randomness from `rng` (the pipeline seeds it
from the run seed and the example's position, which makes augmentation reproducible on resume).
Adding an op:

    @register
    def my_op(arg, key='image'):
      return lambda ex, rng: {**ex, key: do_something(ex[key], arg)}

Images are numpy HWC arrays. Geometric ops keep the dtype (integer results are rounded and
clipped); `value_range` outputs float32.
"""
import ast
import functools
import inspect
import io

import numpy as np

from . import randaugment as _randaugment

_OPS = {}


def register(factory):
  """Makes `factory` available in pp strings under its function name."""
  if factory.__name__ in _OPS:
    raise ValueError(f'pp op {factory.__name__!r} is already registered.')
  _OPS[factory.__name__] = factory
  return factory


def known_ops() -> list[str]:
  return sorted(_OPS)


def _parse(text: str):
  """'name(1, k="v")' -> ('name', (1,), {'k': 'v'})."""
  try:
    node = ast.parse(text.strip(), mode='eval').body
    if isinstance(node, ast.Name):
      return node.id, (), {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
      if any(k.arg is None for k in node.keywords):
        raise ValueError('**kwargs are not supported')
      args = tuple(ast.literal_eval(a) for a in node.args)
      return node.func.id, args, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (SyntaxError, ValueError, TypeError) as e:
    raise ValueError(f'Cannot parse pp op {text.strip()!r} ({_one_line(e)}); '
                     f'expected name or name(literal args).') from None
  raise ValueError(f'Cannot parse pp op {text.strip()!r}; expected name or name(literal args).')


def _one_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def get_op(text: str):
  """Builds one op from its pp-string form, e.g. 'resize(16)'."""
  name, args, kwargs = _parse(text)
  if name not in _OPS:
    raise ValueError(f'Unknown pp op {name!r} in {text.strip()!r}; known ops: '
                     f'{", ".join(known_ops())}.')
  factory = _OPS[name]
  try:
    inspect.signature(factory).bind(*args, **kwargs)
    return factory(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'Bad arguments for pp op {text.strip()!r} ({_one_line(e)}); usage: '
                     f'{name}{inspect.signature(factory)}.') from None


class Preprocess:
  """The composition of the ops of a pp string; pickles as its string (for worker processes)."""

  def __init__(self, spec: str):
    self.spec = spec
    self._ops = [get_op(s) for s in spec.split('|') if s.strip()]

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    example = dict(example)
    for op in self._ops:
      example = op(example, rng)
    return example

  def __reduce__(self):
    return Preprocess, (self.spec,)

  def __repr__(self):
    return f'Preprocess({self.spec!r})'


def _hw(size) -> tuple[int, int]:
  hw = (size, size) if isinstance(size, int) else size
  if not (isinstance(hw, (tuple, list)) and len(hw) == 2
          and all(isinstance(v, int) and v > 0 for v in hw)):
    raise ValueError(f'size must be a positive int or (height, width), got {size!r}')
  return int(hw[0]), int(hw[1])


def _like(x: np.ndarray, dtype) -> np.ndarray:
  """Casts float results back to the input dtype, rounding and clipping for integers."""
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.rint(x), info.min, info.max).astype(dtype)
  return x.astype(dtype)


@functools.lru_cache(maxsize=256)
def _resize_taps(n_in: int, n_out: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
  """Input indices and weights, each (n_out, taps), of a triangle filter along one axis.

  Half-pixel centres as in tf.image.resize. Without antialias this is plain bilinear interpolation
  between the two nearest pixels (edge pixels replicated); with it, the filter widens by the
  downscale factor so that every input pixel contributes.
  """
  scale = n_in / n_out
  width = max(scale, 1.0) if antialias else 1.0
  x = (np.arange(n_out) + 0.5) * scale - 0.5
  if not antialias:
    x = np.clip(x, 0, n_in - 1)
  # The open interval (x - width, x + width) holds at most ceil(2 * width) pixel centres.
  idx = np.floor(x - width)[:, None] + 1 + np.arange(int(np.ceil(2 * width)))
  w = np.maximum(0.0, 1.0 - np.abs(x[:, None] - idx) / width) * ((idx >= 0) & (idx < n_in))
  w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
  idx = np.clip(idx, 0, n_in - 1).astype(np.intp)
  idx.flags.writeable = w.flags.writeable = False  # Shared across threads through the cache.
  return idx, w


def _resize_axis(x: np.ndarray, axis: int, n_out: int, antialias: bool) -> np.ndarray:
  idx, w = _resize_taps(x.shape[axis], n_out, antialias)
  shape = [1] * x.ndim
  shape[axis] = n_out
  return sum(np.take(x, idx[:, t], axis=axis) * w[:, t].reshape(shape)
             for t in range(idx.shape[1]))


def resize_image(image: np.ndarray, size, antialias: bool = False) -> np.ndarray:
  """Bilinear resize of an HWC (or HW) image to `size` = int or (height, width)."""
  h, w = _hw(size)
  img = np.asarray(image)
  x = _resize_axis(img, 0, h, antialias)  # Float32 weights promote uint8 pixels to float32.
  return _like(_resize_axis(x, 1, w, antialias), img.dtype)


@register
def decode(channels=3, key='image'):
  """PNG/JPEG bytes -> uint8 HWC array (via PIL); already-decoded arrays pass through as HWC."""
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels!r}')
  def fn(ex, rng):
    del rng
    img = ex[key]
    if isinstance(img, (bytes, np.bytes_)):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      img = np.asarray(Image.open(io.BytesIO(img)).convert({1: 'L', 3: 'RGB'}[channels]))
    img = np.asarray(img)
    return {**ex, key: img[..., None] if img.ndim == 2 else img}
  return fn


@register
def resize(size, antialias=False, key='image'):
  """Bilinear resize to `size` (int -> square, or (h, w)); antialias matters only when shrinking."""
  _hw(size)
  return lambda ex, rng: {**ex, key: resize_image(ex[key], size, antialias)}


@register
def resize_small(size, antialias=False, key='image'):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  _hw(size)
  def fn(ex, rng):
    h, w = ex[key].shape[:2]
    s = size / min(h, w)
    return {**ex, key: resize_image(ex[key], (max(1, round(h * s)), max(1, round(w * s))),
                                    antialias)}
  return fn


def _crop(img, top, left, h, w):
  if h > img.shape[0] or w > img.shape[1]:
    raise ValueError(f'Cannot crop {(h, w)} from an image of shape {img.shape}.')
  return img[top:top + h, left:left + w]


@register
def central_crop(size, key='image'):
  """Crops the central (h, w) window (offsets rounded down)."""
  h, w = _hw(size)
  def fn(ex, rng):
    img = ex[key]
    return {**ex, key: _crop(img, (img.shape[0] - h) // 2, (img.shape[1] - w) // 2, h, w)}
  return fn


@register
def random_crop(size, key='image'):
  """Crops an (h, w) window at a uniformly random position."""
  h, w = _hw(size)
  def fn(ex, rng):
    img = ex[key]
    top = rng.integers(0, max(img.shape[0] - h, 0) + 1)
    left = rng.integers(0, max(img.shape[1] - w, 0) + 1)
    return {**ex, key: _crop(img, int(top), int(left), h, w)}
  return fn


def inception_crop_box(height: int, width: int, rng: np.random.Generator, area_min=0.08,
                       area_max=1.0, aspect_min=3 / 4, aspect_max=4 / 3, min_object_covered=0.1,
                       max_attempts=10) -> tuple[int, int, int, int] | None:
  """(top, left, h, w) sampled like tf.image.sample_distorted_bounding_box on the whole image.

  Per attempt: aspect ratio a = w / h uniform in [aspect_min, aspect_max] (uniform, not log-uniform,
  in TF); h uniform over the integers from rint(sqrt(area_min * H * W / a)) to
  max_h = rint(sqrt(area_max * H * W / a)), max_h first lowered until rint(max_h * a) <= W and
  max_h <= H; w = rint(h * a) (rint rounds half to even); one step of h +- 1 repairs a rounding that
  left w * h outside the area range. The attempt fails if the area is still outside [area_min, area_max] * H * W or below
  min_object_covered * H * W (the reference's overlap constraint with the whole-image box).
  Offsets are uniform in [0, H - h) and [0, W - w) (TF's exclusive bound: a crop never touches the
  bottom or right edge unless it spans that axis). Returns None when all `max_attempts` fail.
  """
  total = height * width
  min_area, max_area = area_min * total, area_max * total
  for _ in range(max_attempts):
    aspect = aspect_min + rng.random() * (aspect_max - aspect_min)
    h = int(np.rint(np.sqrt(min_area / aspect)))
    max_h = int(np.rint(np.sqrt(max_area / aspect)))
    if np.rint(max_h * aspect) > width:
      max_h = int((width + 0.5 - 1e-7) / aspect)
      if np.rint(max_h * aspect) > width:
        max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
      h += int(rng.integers(max_h - h + 1))
    w = int(np.rint(h * aspect))
    if w * h < min_area:
      h += 1
      w = int(np.rint(h * aspect))
    if w * h > max_area:
      h -= 1
      w = int(np.rint(h * aspect))
    area = w * h
    if (area < min_area or area > max_area or area < min_object_covered * total or
        not (0 < h <= height and 0 < w <= width)):
      continue
    top = int(rng.integers(height - h)) if h < height else 0
    left = int(rng.integers(width - w)) if w < width else 0
    return top, left, h, w
  return None


def padded_central_box(height: int, width: int, size, pad: int) -> tuple[int, int, int, int]:
  """(top, left, h, w): the central window of the output's aspect ratio, scaled by
  s = min(H / (size_h + pad), W / (size_w + pad)): h = floor(s * size_h), w = floor(s * size_w),
  offsets rounded up (the reference's eval crop; pad 0 gives the largest such window)."""
  sh, sw = _hw(size)
  if height * (sw + pad) <= width * (sh + pad):
    h, w = height * sh // (sh + pad), height * sw // (sh + pad)
  else:
    h, w = width * sh // (sw + pad), width * sw // (sw + pad)
  h, w = max(1, min(h, height)), max(1, min(w, width))
  return (height - h + 1) // 2, (width - w + 1) // 2, h, w


@register
def inception_crop(size, area_min=0.08, area_max=1.0, aspect_min=3 / 4, aspect_max=4 / 3,
                   min_object_covered=0.1, max_attempts=10, fallback_pad=32, antialias=False,
                   key='image'):
  """Random-resized ("Inception") crop as in the NFNet reference, then bilinear resize to `size`.

  The box comes from `inception_crop_box` (TF's sample_distorted_bounding_box; the defaults are the
  reference's). If every attempt fails, or the box is the whole image (the reference cannot tell
  the two apart), the crop is `padded_central_box(size, fallback_pad)`: the reference's eval crop,
  a fraction size / (size + 32) of the shorter side. Use fallback_pad=0 on images not much larger
  than `size` (on an 8x8 image with size 8, pad 32 would leave a single pixel).
  """
  _hw(size)
  if not 0 < area_min <= area_max <= 1:
    raise ValueError(f'need 0 < area_min <= area_max <= 1, got {area_min}, {area_max}')
  if not 0 < aspect_min <= aspect_max:
    raise ValueError(f'need 0 < aspect_min <= aspect_max, got {aspect_min}, {aspect_max}')
  if not (isinstance(max_attempts, int) and max_attempts > 0) or fallback_pad < 0:
    raise ValueError(f'need max_attempts >= 1 and fallback_pad >= 0, got {max_attempts}, '
                     f'{fallback_pad}')
  def fn(ex, rng):
    img = ex[key]
    height, width = img.shape[:2]
    box = inception_crop_box(height, width, rng, area_min, area_max, aspect_min, aspect_max,
                             min_object_covered, max_attempts)
    if box is None or box[2:] == (height, width):
      box = padded_central_box(height, width, size, fallback_pad)
    return {**ex, key: resize_image(_crop(img, *box), size, antialias)}
  return fn


@register
def randaugment(num_layers, magnitude, translate_const=100, cutout_const=40, key='image'):
  """RandAugment with the reference's 16 ops (see `randaugment.py`): `num_layers` uniformly chosen
  ops, each always applied at the fixed `magnitude` (10 = the reference's maximum level; larger
  extrapolates). Translate and Cutout sizes are in pixels: translate_const * magnitude / 10 and a
  square of side up to 2 * int(cutout_const * magnitude / 10). Takes uint8 or 0..255 images with 1
  or 3 channels; non-uint8 input is clipped and truncated to uint8 first and returned as float32.
  """
  if not (isinstance(num_layers, int) and num_layers >= 0):
    raise ValueError(f'num_layers must be an int >= 0, got {num_layers!r}')
  if not (isinstance(magnitude, (int, float)) and magnitude >= 0):
    raise ValueError(f'magnitude must be a number >= 0, got {magnitude!r}')
  if translate_const < 0 or cutout_const < 0:
    raise ValueError(f'translate_const and cutout_const must be >= 0, got {translate_const}, '
                     f'{cutout_const}')
  def fn(ex, rng):
    img = np.asarray(ex[key])
    out = _randaugment.distort(img, num_layers, magnitude, rng, translate_const, cutout_const)
    return {**ex, key: out if img.dtype == np.uint8 else out.astype(np.float32)}
  return fn


@register
def flip_lr(key='image'):
  """Mirrors the image left-right with probability 0.5."""
  return lambda ex, rng: {**ex, key: ex[key][:, ::-1]} if rng.random() < 0.5 else ex


@register
def value_range(lo, hi, in_lo=0, in_hi=255, clip=False, key='image'):
  """Maps [in_lo, in_hi] linearly onto [lo, hi] (float32); `clip` clamps to [lo, hi]."""
  if in_hi == in_lo:
    raise ValueError('in_lo and in_hi must differ')
  scale = (hi - lo) / (in_hi - in_lo)
  def fn(ex, rng):
    x = (np.asarray(ex[key], np.float32) - in_lo) * np.float32(scale) + np.float32(lo)
    return {**ex, key: np.clip(x, min(lo, hi), max(lo, hi)) if clip else x}
  return fn


@register
def standardize(mean, std, key='image'):
  """(x - mean) / std in float32; mean and std are scalars or per-channel sequences."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if mean.ndim > 1 or std.ndim > 1 or np.any(std == 0):
    raise ValueError(f'mean and std must be scalars or 1-D, std nonzero; got {mean}, {std}')
  return lambda ex, rng: {**ex, key: (np.asarray(ex[key], np.float32) - mean) / std}


@register
def onehot(num_classes, key='label', key_result='labels', on=1.0, off=0.0):
  """Integer label(s) -> float32 [num_classes] vector; several labels give a k-hot vector.

  Label smoothing with factor eps: on = 1 - eps + eps / num_classes, off = eps / num_classes.
  """
  def fn(ex, rng):
    labels = np.asarray(ex[key]).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f'onehot: label {ex[key]!r} outside [0, {num_classes}).')
    out = np.full((num_classes,), off, np.float32)
    out[labels] = on
    return {**ex, key_result: out}
  return fn


@register
def keep(*keys):
  """Drops every key of the example except `keys`."""
  def fn(ex, rng):
    missing = [k for k in keys if k not in ex]
    if missing:
      raise KeyError(f'keep: keys {missing} not in example (has {sorted(ex)}).')
    return {k: ex[k] for k in keys}
  return fn
