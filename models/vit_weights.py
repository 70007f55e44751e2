"""ViT weights in other layouts: timm's `VisionTransformer` and HF transformers' `ViTForImageClassification`.

`from_timm(state_dict, num_heads)` and `from_hf(hf_config, state_dict)` convert a state dict of numpy
arrays (or CPU torch tensors) to (model_kwargs, params) for `models.vit.Model`; scan=True gives the
stacked `encoder/blocks` layout. Both are also reachable as `models.vit.from_timm` / `models.vit.from_hf`.
"""
from collections.abc import Mapping
import math
from typing import Any

import numpy as np

from models import common, vit

Params = dict[str, Any]
Pair = common.Pair


class _Reader:
  """Pops float32 numpy arrays from a state dict and reports keys never read."""

  def __init__(self, state_dict: Mapping[str, Any], source: str):
    self.sd = dict(state_dict)
    self.source = source

  def __contains__(self, key: str) -> bool:
    return key in self.sd

  def __call__(self, key: str) -> np.ndarray:
    # np.asarray also accepts CPU torch tensors without importing torch here.
    return np.asarray(self.sd.pop(key), dtype=np.float32)

  def linear(self, prefix: str) -> dict[str, np.ndarray]:
    """torch Linear (out, in) -> Dense {'kernel': (in, out), 'bias'}."""
    return {'kernel': self(f'{prefix}.weight').T, 'bias': self(f'{prefix}.bias')}

  def layernorm(self, prefix: str) -> dict[str, np.ndarray]:
    return {'scale': self(f'{prefix}.weight'), 'bias': self(f'{prefix}.bias')}

  def patch_embed(self, prefix: str) -> dict[str, np.ndarray]:
    # torch Conv2d (out, in, kh, kw) -> flax Conv (kh, kw, in, out).
    kernel = self(f'{prefix}.weight').transpose(2, 3, 1, 0)
    return {'kernel': kernel, 'bias': self(f'{prefix}.bias')}

  def done(self) -> None:
    if self.sd:
      raise ValueError(f'Unsupported {self.source} weights (not a plain ViT): {sorted(self.sd)}')


def _heads(dense: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """Dense (in, heads*hd) -> DenseGeneral (in, heads, hd)."""
  d_in, d_out = dense['kernel'].shape
  out = {'kernel': dense['kernel'].reshape(d_in, num_heads, d_out // num_heads)}
  if 'bias' in dense:
    out['bias'] = dense['bias'].reshape(num_heads, d_out // num_heads)
  return out


def _out_proj(dense: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """Dense (heads*hd, out) -> DenseGeneral (heads, hd, out)."""
  d_in, d_out = dense['kernel'].shape
  return {'kernel': dense['kernel'].reshape(num_heads, d_in // num_heads, d_out),
          'bias': dense['bias']}


def _grid(n: int, grid_hw: Pair | None) -> tuple[int, int]:
  if grid_hw is not None:
    return common.pair(grid_hw)
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'{n} position tokens are not a square grid; pass grid_hw')
  return side, side


def _block(r: '_Reader', attn: Params, ln1: str, ln2: str, mlp: str) -> Params:
  return {'ln1': r.layernorm(ln1), 'attn': attn, 'ln2': r.layernorm(ln2),
          'mlp': {'fc1': r.linear(f'{mlp}.fc1'), 'fc2': r.linear(f'{mlp}.fc2')}}


def _head(r: '_Reader', name: str, params: Params) -> int:
  """Reads the classifier `name` into params['head'] if present; returns the class count (0 if not)."""
  if f'{name}.weight' not in r:
    return 0
  params['head'] = r.linear(name)
  return params['head']['kernel'].shape[1]


def _finish(kwargs: dict[str, Any], params: Params, scan: bool) -> tuple[dict[str, Any], Params]:
  kwargs['scan'] = scan
  return kwargs, vit.stack_layers(params) if scan else params


def from_timm(state_dict: Mapping[str, Any], num_heads: int, *, grid_hw: Pair | None = None,
              scan: bool = False) -> tuple[dict[str, Any], Params]:
  """Converts a timm `VisionTransformer` state dict (numpy arrays) to (model_kwargs, params).

  Supports the classic layout: optional class token (pool 'tok' if present, else
  'gap' — timm's 'avg' pool without fc_norm), learned `pos_embed` covering the class
  token, optional legacy `pre_logits.fc`. Other timm features (fc_norm, register
  tokens, layer scale, qk-norm, ...) raise. `grid_hw` gives the posemb patch grid;
  by default it is assumed square.
  """
  r = _Reader(state_dict, 'timm')
  params: Params = {'embedding': r.patch_embed('patch_embed.proj')}
  ph, pw, _, width = params['embedding']['kernel'].shape
  has_cls = 'cls_token' in r
  if has_cls:
    params['cls'] = r('cls_token')
  params['pos_embedding'] = r('pos_embed')
  num_prefix = int(has_cls)
  gh, gw = _grid(params['pos_embedding'].shape[1] - num_prefix, grid_hw)

  enc: Params = {}
  depth = 0
  while f'blocks.{depth}.norm1.weight' in r:
    p = f'blocks.{depth}'
    qkv_w = r(f'{p}.attn.qkv.weight')
    qkv_b = r(f'{p}.attn.qkv.bias') if f'{p}.attn.qkv.bias' in r else None
    attn = {}
    for j, name in enumerate(('query', 'key', 'value')):
      dense = {'kernel': qkv_w[j * width:(j + 1) * width].T}
      if qkv_b is not None:
        dense['bias'] = qkv_b[j * width:(j + 1) * width]
      attn[name] = _heads(dense, num_heads)
    attn['out'] = _out_proj(r.linear(f'{p}.attn.proj'), num_heads)
    enc[f'block_{depth}'] = _block(r, attn, f'{p}.norm1', f'{p}.norm2', f'{p}.mlp')
    depth += 1
  enc['ln_final'] = r.layernorm('norm')
  params['encoder'] = enc
  mlp_dim = enc['block_0']['mlp']['fc1']['kernel'].shape[1]

  representation_size = None
  if 'pre_logits.fc.weight' in r:
    params['pre_logits'] = r.linear('pre_logits.fc')
    representation_size = params['pre_logits']['kernel'].shape[1]
  num_classes = _head(r, 'head', params)
  r.done()

  kwargs = dict(
      num_classes=num_classes, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
      patch_size=(ph, pw), posemb='learn', posemb_grid=(gh, gw),
      pool_type='tok' if has_cls else 'gap', representation_size=representation_size,
      layernorm_epsilon=1e-6, gelu_approximate=False, qkv_bias=qkv_b is not None)
  return _finish(kwargs, params, scan)


_HF_GELU_APPROXIMATE = {'gelu': False, 'gelu_new': True, 'gelu_pytorch_tanh': True,
                        'gelu_fast': True}


def from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
            scan: bool = False) -> tuple[dict[str, Any], Params]:
  """Converts HF transformers 5.x `ViTForImageClassification` (or `ViTModel`) weights.

  `hf_config` is `config.to_dict()`. Logits come from the final-LayerNorm'ed class
  token through `classifier`; HF's tanh `pooler` (only in `ViTModel`, unused for
  classification) is dropped. Without a classifier num_classes is 0 (features).
  """
  act = hf_config.get('hidden_act', 'gelu')
  if act not in _HF_GELU_APPROXIMATE:
    raise ValueError(f'Unsupported HF hidden_act {act!r}; supported: {list(_HF_GELU_APPROXIMATE)}')
  num_heads = int(hf_config['num_attention_heads'])
  prefix = 'vit.' if any(k.startswith('vit.') for k in state_dict) else ''
  r = _Reader({k: v for k, v in state_dict.items() if not k.startswith(f'{prefix}pooler.')}, 'HF')
  emb = f'{prefix}embeddings'
  params: Params = {'embedding': r.patch_embed(f'{emb}.patch_embeddings.projection'),
                    'cls': r(f'{emb}.cls_token'),
                    'pos_embedding': r(f'{emb}.position_embeddings')}
  ph, pw = common.pair(hf_config.get('patch_size', 16))
  ih, iw = common.pair(hf_config.get('image_size', 224))

  qkv_bias = bool(hf_config.get('qkv_bias', True))
  enc: Params = {}
  depth = int(hf_config['num_hidden_layers'])
  for i in range(depth):
    p = f'{prefix}layers.{i}'
    attn = {}
    for name, hf_name in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      dense = {'kernel': r(f'{p}.attention.{hf_name}.weight').T}
      if qkv_bias:
        dense['bias'] = r(f'{p}.attention.{hf_name}.bias')
      attn[name] = _heads(dense, num_heads)
    attn['out'] = _out_proj(r.linear(f'{p}.attention.o_proj'), num_heads)
    enc[f'block_{i}'] = _block(r, attn, f'{p}.layernorm_before', f'{p}.layernorm_after', f'{p}.mlp')
  enc['ln_final'] = r.layernorm(f'{prefix}layernorm')
  params['encoder'] = enc
  num_classes = _head(r, 'classifier', params)
  r.done()

  kwargs = dict(
      num_classes=num_classes, width=int(hf_config['hidden_size']), depth=depth,
      mlp_dim=int(hf_config['intermediate_size']), num_heads=num_heads, patch_size=(ph, pw),
      posemb='learn', posemb_grid=(ih // ph, iw // pw), pool_type='tok',
      representation_size=None, layernorm_epsilon=float(hf_config.get('layer_norm_eps', 1e-12)),
      gelu_approximate=_HF_GELU_APPROXIMATE[act], qkv_bias=qkv_bias)
  return _finish(kwargs, params, scan)
