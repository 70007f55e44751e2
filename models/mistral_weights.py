"""Mistral weights in other layouts: HF transformers' MistralForCausalLM and the original release.

Conversions work tensor by tensor (`hf_tensor_to_param`, `param_to_hf_tensor`, `original_tensor_to_hf`) so
that a checkpoint can be streamed shard by shard (train/convert.py); `from_hf`, `to_hf` and `from_original`
convert whole state dicts of numpy arrays. Parameters are in the unscanned layout (`layer_{i}`);
`stack_layers` / `unstack_layers` convert to and from Model(scan=True)'s stacked `layers`.
"""
from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from models import common

Params = dict[str, Any]


def stack_layers(params: Params) -> Params:
  """Converts scan=False params (layer_{i}) to scan=True (layers, stacked on axis 0)."""
  return common.stack_layers(params, 'layer_', 'layers')


def unstack_layers(params: Params) -> Params:
  """Converts scan=True params (layers, stacked) to scan=False (layer_{i})."""
  return common.unstack_layers(params, 'layer_', 'layers')


def _rope_theta(cfg: Mapping[str, Any]) -> float:
  rope_params = cfg.get('rope_parameters') or {}
  if rope_params.get('rope_type', 'default') != 'default':
    raise ValueError(f"Only rope_type 'default' is supported, got {rope_params['rope_type']!r}")
  theta = cfg.get('rope_theta', rope_params.get('rope_theta'))
  if theta is None:
    raise ValueError('HF config has no rope_theta (Mistral v0.1: 1e4, later releases 1e6); set it.')
  return float(theta)


def model_kwargs_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """HF MistralConfig dict -> Model kwargs (shape fields only)."""
  e, h = hf_config['hidden_size'], hf_config['num_attention_heads']
  return dict(embed_dim=e, num_layers=hf_config['num_hidden_layers'], num_heads=h,
              num_kv_heads=hf_config['num_key_value_heads'], head_dim=hf_config.get('head_dim') or e // h,
              mlp_dim=hf_config['intermediate_size'], sliding_window=hf_config.get('sliding_window'),
              vocab_size=hf_config['vocab_size'], norm_eps=float(hf_config['rms_norm_eps']),
              rope_theta=_rope_theta(hf_config),
              tie_embeddings=bool(hf_config.get('tie_word_embeddings', False)))


def hf_config_from_kwargs(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  k = model_kwargs
  return dict(model_type='mistral', architectures=['MistralForCausalLM'], hidden_size=k['embed_dim'],
              num_hidden_layers=k['num_layers'], num_attention_heads=k['num_heads'],
              num_key_value_heads=k['num_kv_heads'], head_dim=k['head_dim'], intermediate_size=k['mlp_dim'],
              sliding_window=k['sliding_window'], vocab_size=k['vocab_size'], rms_norm_eps=k['norm_eps'],
              hidden_act='silu', rope_parameters={'rope_type': 'default', 'rope_theta': k['rope_theta']},
              tie_word_embeddings=k.get('tie_embeddings', False))


_HF_LAYER = re.compile(r'model\.layers\.(\d+)\.(.+)')
_HF_LAYER_PARAMS = {  # HF name within a layer -> our path within `layer_{i}`
    'input_layernorm.weight': ('attn_norm', 'scale'),
    'post_attention_layernorm.weight': ('mlp_norm', 'scale'),
    'self_attn.q_proj.weight': ('attn', 'query', 'kernel'),
    'self_attn.k_proj.weight': ('attn', 'key', 'kernel'),
    'self_attn.v_proj.weight': ('attn', 'value', 'kernel'),
    'self_attn.o_proj.weight': ('attn', 'out', 'kernel'),
    'mlp.gate_proj.weight': ('mlp', 'gate', 'kernel'),
    'mlp.up_proj.weight': ('mlp', 'up', 'kernel'),
    'mlp.down_proj.weight': ('mlp', 'down', 'kernel'),
}


def hf_names(model_kwargs: Mapping[str, Any]) -> list[str]:
  """Every tensor name of the HF state dict of a model with these kwargs."""
  names = ['model.embed_tokens.weight', 'model.norm.weight']
  if not model_kwargs.get('tie_embeddings'):
    names.append('lm_head.weight')
  names += [f'model.layers.{i}.{n}' for i in range(model_kwargs['num_layers']) for n in _HF_LAYER_PARAMS]
  return names


def hf_tensor_to_param(name: str, array: np.ndarray,
                       model_kwargs: Mapping[str, Any]) -> tuple[tuple[str, ...], np.ndarray] | None:
  """One HF tensor -> (our unscanned parameter path, value), or None for a tensor we do not keep.

  Works tensor by tensor, so a checkpoint can be converted while streaming it shard by shard.
  """
  e, d = model_kwargs['embed_dim'], model_kwargs['head_dim']
  if name == 'model.embed_tokens.weight':
    return ('embedding',), array
  if name == 'model.norm.weight':
    return ('final_norm', 'scale'), array
  if name == 'lm_head.weight':
    return None if model_kwargs.get('tie_embeddings') else (('head', 'kernel'), array.T)
  match = _HF_LAYER.fullmatch(name)
  if not match or match.group(2) not in _HF_LAYER_PARAMS:
    raise ValueError(f'unexpected tensor {name!r} in a Mistral checkpoint; is this a MistralForCausalLM?')
  path = (f'layer_{match.group(1)}', *_HF_LAYER_PARAMS[match.group(2)])
  kind = path[2]
  if kind in ('query', 'key', 'value'):  # [heads*d, e] -> [e, heads, d]
    return path, array.T.reshape(e, -1, d)
  if kind == 'out':  # [e, heads*d] -> [heads, d, e]
    return path, array.T.reshape(-1, d, e)
  return path, (array.T if array.ndim == 2 else array)


def param_to_hf_tensor(path: tuple[str, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `hf_tensor_to_param` for one unscanned parameter."""
  if path == ('embedding',):
    return 'model.embed_tokens.weight', array
  if path == ('final_norm', 'scale'):
    return 'model.norm.weight', array
  if path == ('head', 'kernel'):
    return 'lm_head.weight', array.T
  inner = {v: k for k, v in _HF_LAYER_PARAMS.items()}[path[1:]]
  name = f'model.layers.{path[0][len("layer_"):]}.{inner}'
  if path[2] in ('query', 'key', 'value'):
    return name, array.reshape(array.shape[0], -1).T
  if path[2] == 'out':
    return name, array.reshape(-1, array.shape[-1]).T
  return name, (array.T if array.ndim == 2 else array)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def flat_params(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from flat_params(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def from_hf(hf_config: Mapping[str, Any],
            state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], Params]:
  """HF MistralForCausalLM (config dict, numpy state dict) -> (Model kwargs, scan=False params)."""
  kwargs = model_kwargs_from_hf(hf_config)
  missing = sorted(set(hf_names(kwargs)) - set(state_dict))
  if missing:
    raise ValueError(f'{len(missing)} tensors missing from the state dict, e.g. {missing[:3]}; '
                     'is it complete (all shards)?')
  params: Params = {}
  for name, array in state_dict.items():
    converted = hf_tensor_to_param(name, np.asarray(array), kwargs)
    if converted is not None:
      _set(params, *converted)
  return kwargs, params


def to_hf(model_kwargs: Mapping[str, Any],
          params: Params) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(Model kwargs, params, scanned or not) -> HF MistralForCausalLM (config, numpy state dict)."""
  if 'layers' in params:
    params = unstack_layers(params)
  state_dict = dict(param_to_hf_tensor(path, np.asarray(value)) for path, value in flat_params(params))
  return hf_config_from_kwargs(model_kwargs), state_dict


# The original release (consolidated.*.pth + params.json) names and RoPE layout.
_ORIGINAL_NAMES = {'tok_embeddings.weight': 'model.embed_tokens.weight', 'norm.weight': 'model.norm.weight',
                   'output.weight': 'lm_head.weight'}
_ORIGINAL_LAYER_NAMES = {
    'attention_norm.weight': 'input_layernorm.weight', 'ffn_norm.weight': 'post_attention_layernorm.weight',
    'attention.wq.weight': 'self_attn.q_proj.weight', 'attention.wk.weight': 'self_attn.k_proj.weight',
    'attention.wv.weight': 'self_attn.v_proj.weight', 'attention.wo.weight': 'self_attn.o_proj.weight',
    'feed_forward.w1.weight': 'mlp.gate_proj.weight', 'feed_forward.w3.weight': 'mlp.up_proj.weight',
    'feed_forward.w2.weight': 'mlp.down_proj.weight'}


def hf_config_from_original(params_json: Mapping[str, Any], rope_theta: float | None = None) -> dict[str, Any]:
  """The original release's params.json -> an HF config dict. v0.1's params.json has no rope_theta."""
  theta = params_json.get('rope_theta', rope_theta)
  if theta is None:
    raise ValueError('params.json has no rope_theta: pass rope_theta (Mistral 7B v0.1: 10000.0, '
                     'v0.2 and later: 1000000.0).')
  e, h = params_json['dim'], params_json['n_heads']
  return dict(hidden_size=e, num_hidden_layers=params_json['n_layers'], num_attention_heads=h,
              num_key_value_heads=params_json.get('n_kv_heads', h), head_dim=params_json.get('head_dim') or e // h,
              intermediate_size=params_json['hidden_dim'], sliding_window=params_json.get('sliding_window'),
              vocab_size=params_json['vocab_size'], rms_norm_eps=params_json['norm_eps'], rope_theta=theta,
              tie_word_embeddings=False)


def original_tensor_to_hf(name: str, array: np.ndarray, head_dim: int) -> tuple[str, np.ndarray]:
  """One original-format tensor -> (HF name, value). Query and key rows are permuted per head.

  The original code rotates adjacent pairs (rows 2j, 2j+1 of a head); the HF half-split RoPE pairs rows
  j and j + head_dim/2. Moving row 2j to j and row 2j+1 to head_dim/2 + j gives identical dot products.
  """
  if name in _ORIGINAL_NAMES:
    return _ORIGINAL_NAMES[name], array
  match = re.fullmatch(r'layers\.(\d+)\.(.+)', name)
  if not match or match.group(2) not in _ORIGINAL_LAYER_NAMES:
    raise ValueError(f'unexpected tensor {name!r} in an original-format Mistral checkpoint.')
  hf_name = f'model.layers.{match.group(1)}.{_ORIGINAL_LAYER_NAMES[match.group(2)]}'
  if match.group(2) in ('attention.wq.weight', 'attention.wk.weight'):
    rows, cols = array.shape
    array = array.reshape(rows // head_dim, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
  return hf_name, array


def from_original(params_json: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], *,
                  rope_theta: float | None = None) -> tuple[dict[str, Any], Params]:
  """Original release (params.json dict, numpy consolidated state dict) -> (Model kwargs, params)."""
  hf_config = hf_config_from_original(params_json, rope_theta)
  hf_state = dict(original_tensor_to_hf(n, np.asarray(a), hf_config['head_dim']) for n, a in state_dict.items())
  return from_hf(hf_config, hf_state)
