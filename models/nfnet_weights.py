"""NFNet weights in other layouts: timm's `dm_nfnet_*` (NormFreeNet) state dicts.

`from_timm(state_dict, variant)` converts a state dict of numpy arrays (or CPU torch tensors) to
(model_kwargs, params) for `models.nfnet.Model`; it is also reachable as `models.nfnet.from_timm`.
"""
from collections.abc import Mapping
from typing import Any

import numpy as np

from models import nfnet

Params = dict[str, Any]


class _Reader:
  """Pops float32 numpy arrays from a timm state dict and reports keys never read."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.sd = dict(state_dict)

  def __call__(self, key: str) -> np.ndarray:
    if key not in self.sd:
      raise ValueError(f'timm NFNet state dict lacks {key!r}; wrong variant?')
    # np.asarray also accepts CPU torch tensors without importing torch here.
    return np.asarray(self.sd.pop(key), dtype=np.float32)

  def conv(self, prefix: str) -> dict[str, np.ndarray]:
    """ScaledStdConv2d: weight OIHW -> kernel HWIO, gain (out, 1, 1, 1) -> (out,)."""
    return {'kernel': self(f'{prefix}.weight').transpose(2, 3, 1, 0),
            'gain': self(f'{prefix}.gain').reshape(-1), 'bias': self(f'{prefix}.bias')}

  def pointwise(self, prefix: str) -> dict[str, np.ndarray]:
    """1x1 Conv2d (out, in, 1, 1) or Linear (out, in) -> Dense kernel (in, out)."""
    weight = self(f'{prefix}.weight')
    return {'kernel': weight.reshape(weight.shape[:2]).T, 'bias': self(f'{prefix}.bias')}

  def done(self) -> None:
    if self.sd:
      raise ValueError(f'Unsupported timm NFNet weights (not a dm_nfnet_* layout): {sorted(self.sd)}')


def from_timm(state_dict: Mapping[str, Any], variant: str) -> tuple[dict[str, Any], Params]:
  """timm `dm_nfnet_*` state dict (numpy arrays) -> (Model kwargs with numerics='timm', params).

  `variant` is 'F0'..'F6' (or timm's 'dm_nfnet_f0'...). A state dict without 'head.fc.weight'
  (num_classes=0 in timm) gives num_classes=0.
  """
  variant = variant.upper().removeprefix('DM_NFNET_')
  num_classes = len(state_dict['head.fc.weight']) if 'head.fc.weight' in state_dict else 0
  kwargs = dict(variant=variant, num_classes=num_classes, numerics='timm')
  arch = nfnet.Model(**kwargs).arch()
  r = _Reader(state_dict)
  params: Params = {'stem': {f'conv{i + 1}': r.conv(f'stem.conv{i + 1}') for i in range(len(arch.stem))}}
  for s, blocks in enumerate(arch.stages):
    stage = params[f'stage_{s}'] = {}
    for j, spec in enumerate(blocks):
      prefix = f'stages.{s}.{j}'
      block = {name: r.conv(f'{prefix}.{name}') for name in ('conv1', 'conv2', 'conv2b', 'conv3')}
      if spec.has_shortcut_conv:
        block['shortcut'] = r.conv(f'{prefix}.downsample.conv')
      block['se'] = {fc: r.pointwise(f'{prefix}.attn_last.{fc}') for fc in ('fc1', 'fc2')}
      block['skip_gain'] = r(f'{prefix}.skipinit_gain').reshape(())
      stage[f'block_{j}'] = block
  params['final_conv'] = r.conv('final_conv')
  if num_classes:
    params['head'] = r.pointwise('head.fc')
  r.done()
  return kwargs, params
