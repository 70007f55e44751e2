"""Batch-level MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019), as in the NFNet reference.

The reference (DeepMind's `nfnets/dataset.py`, `my_mixup_cutmix`) batches TWICE the batch size and
mixes pairs of distinct examples, so every output example combines two fresh examples and the output
batch is half the input. With both methods on, the input's quarters [A | B | C | D] give
[MixUp(A, B) | CutMix(C, D)]: MixUp on the first half of the output, CutMix on the second. Lambda is
drawn per example, not per batch:

  MixUp:  lam ~ Beta(mixup_alpha, mixup_alpha);  x = lam * x_a + (1 - lam) * x_b (in float32, as
          x_b + lam * (x_a - x_b), which never leaves the range of the two pixels).
  CutMix: centre (cy, cx) uniform over the pixels, u ~ Beta(cutmix_alpha, cutmix_alpha) (the
          reference hard-codes Beta(1, 1), i.e. uniform), side fraction r = sqrt(1 - u),
          ch = floor(r * H), cw = floor(r * W); the box is rows [cy - ch // 2, cy + ch // 2) and
          columns [cx - cw // 2, cx + cw // 2), clipped to the image; x_a inside the box, x_b
          outside, and lam = box area / (H * W), i.e. corrected to the true (clipped) area.

Labels mix with the same lam: y = lam * y_a + (1 - lam) * y_b, so soft labels that sum to one still
do. Any other key keeps the value of the `a` example of each pair.
"""
import numpy as np


def _box_mask(h: int, w: int, rng: np.random.Generator, alpha: float) -> np.ndarray:
  cy, cx = int(rng.integers(h)), int(rng.integers(w))
  side = np.sqrt(1.0 - rng.beta(alpha, alpha))
  half_h, half_w = int(side * h) // 2, int(side * w) // 2
  mask = np.zeros((h, w), bool)
  mask[max(0, cy - half_h):min(h, cy + half_h), max(0, cx - half_w):min(w, cx + half_w)] = True
  return mask


def mix_batch(batch: dict, rng: np.random.Generator, mixup_alpha: float | None = 0.2,
              cutmix_alpha: float | None = 1.0, image_key: str = 'image',
              labels_key: str = 'labels') -> dict:
  """Mixes a batch of 2n examples into n (see the module docstring); returns a new dict.

  `image_key` holds [2n, h, w, c] images (mixed in float32) and `labels_key` [2n, classes] soft
  labels. An alpha of None or 0 turns its method off; with both on, the first n // 2 outputs use
  MixUp and the other n - n // 2 CutMix; with one on, all n use it.
  """
  if image_key not in batch or labels_key not in batch:
    raise ValueError(f'mix_batch needs {image_key!r} and soft {labels_key!r} ([batch, classes], '
                     f'e.g. from the onehot pp op); the batch has {sorted(batch)}.')
  images = np.asarray(batch[image_key], np.float32)
  labels = np.asarray(batch[labels_key], np.float32)
  use_mixup, use_cutmix = bool(mixup_alpha), bool(cutmix_alpha)
  if not (use_mixup or use_cutmix):
    raise ValueError('mix_batch needs mixup_alpha or cutmix_alpha > 0.')
  if images.ndim != 4 or labels.ndim != 2:
    raise ValueError(f'mix_batch needs images [b, h, w, c] and labels [b, classes], got shapes '
                     f'{images.shape} and {labels.shape}.')
  if len(images) % 2 or not len(images) or len(labels) != len(images):
    raise ValueError(f'mix_batch needs an even, nonzero number of examples (it returns half), '
                     f'got {len(images)} images and {len(labels)} labels.')
  n = len(images) // 2
  num_mixup = (n // 2 if use_cutmix else n) if use_mixup else 0
  num_cutmix = n - num_mixup
  # Output i mixes first[i] (weight lam) with second[i]: quarters [A|B|C|D] -> (A, B) then (C, D).
  first = np.concatenate([np.arange(num_mixup), 2 * num_mixup + np.arange(num_cutmix)])
  second = np.concatenate([num_mixup + np.arange(num_mixup),
                           2 * num_mixup + num_cutmix + np.arange(num_cutmix)])
  x_a, x_b = images[first], images[second]
  lam = np.empty(n, np.float32)
  lam[:num_mixup] = rng.beta(mixup_alpha, mixup_alpha, num_mixup) if num_mixup else []
  out_images = np.empty_like(x_a)
  mix = slice(0, num_mixup)
  # x_b + lam (x_a - x_b) rather than lam x_a + (1 - lam) x_b: it stays within the pixels' range.
  out_images[mix] = x_b[mix] + lam[mix, None, None, None] * (x_a[mix] - x_b[mix])
  h, w = images.shape[1:3]
  for i in range(num_mixup, n):
    mask = _box_mask(h, w, rng, cutmix_alpha)
    lam[i] = mask.mean()
    out_images[i] = np.where(mask[..., None], x_a[i], x_b[i])
  out = {k: np.asarray(v)[first] for k, v in batch.items()}
  out[image_key] = out_images
  out[labels_key] = labels[second] + lam[:, None] * (labels[first] - labels[second])
  return out
