"""Adapters: how a model's parameters are cut into `trainable` and a frozen `base`, and merged back.

The step differentiates, optimises, EMAs and checkpoints only `trainable`; the `base` is a frozen tree (never
differentiated, never donated, never checkpointed) rebuilt from the run's initial parameters at every start.
The objective always sees the merged parameters, so no objective and no part of the loop knows which
adapter is on. Chosen by `config.adapter.name` (absent: `none`):

  none     trainable = every parameter, base = {} (plain training).
  freeze   `params`: a regex over parameter names ('/'-joined paths, matched in full); matching parameters go
           to the base and get no gradient, no optimizer state and no EMA; the rest are trainable.
  lora     low-rank factors on the kernels `params` matches (Mistral's seven projections by default); `rank`,
           `alpha`, `dropout`, `rslora`; see train/lora.py.
  qlora    lora over a base whose adapted kernels are stored in NF4 (train/nf4.py); rank 64, alpha 16, dropout 0.1.

An adapter works on nested dicts of any leaves: real arrays, abstract shapes, shardings, or flax's
logical-axis boxes, so the shardings of both halves follow from the model's own logical axes. A new
adapter (LoRA: trainable A and B beside a base holding every kernel) implements `split` and `merge` and
registers here; the loop and the step do not change. `split` may draw new trainable parameters from `rng`, but
the base it returns must not depend on `rng`: it is rebuilt at every resume and by the run loader.

Besides split and merge, an adapter has `wrap(model)` (the model the step applies, e.g. LoRA's, which creates and
uses its factors), `export(trainable, base)` (plain model parameters, for the run loader and exports) and
optionally `new_params`, a regex naming the parameters it adds (never read from config.init_params), and
`describe(trainable, base)`, a start-up line.
"""
from collections.abc import Mapping
import re
from typing import Any

import flax.linen as nn
from flax import traverse_util

from train import build
from train import lora

Params = Any


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/') if tree else {}


def _nest(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def num_elements(tree) -> int:
  """Elements of every leaf of a parameter tree (arrays, ShapeDtypeStructs or logical-axis boxes)."""
  total = 0
  for leaf in _flat(tree).values():
    # No sharding constraint: counting must work inside a mesh's rules too (the loop counts a new shape there).
    leaf = leaf.unbox(apply_constraint=False) if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    size = 1
    for d in getattr(leaf, 'shape', ()):
      size *= d
    total += size
  return total


class NoAdapter:
  """Everything is trained."""
  name = 'none'

  def split(self, params: Params, rng=None) -> tuple[Params, Params]:
    del rng
    return params, {}

  def merge(self, trainable: Params, base: Params) -> Params:
    del base
    return trainable

  def wrap(self, model):
    return model

  def export(self, trainable: Params, base: Params) -> Params:
    return self.merge(trainable, base)


class Freeze:
  """Parameters whose names match `params` stay as they start; the others train."""
  name = 'freeze'

  def __init__(self, params: str | None = None):
    if not params:
      raise ValueError("adapter.name='freeze' needs adapter.params, a regex over parameter names "
                       "(e.g. 'encoder/.*'); set it in the config.")
    try:
      self.pattern = re.compile(params)
    except re.error as e:
      raise ValueError(f'adapter.params={params!r} is not a valid regex ({e}); fix it in the config.') from None

  def split(self, params: Params, rng=None) -> tuple[Params, Params]:
    del rng
    flat = _flat(params)
    frozen = {k: v for k, v in flat.items() if self.pattern.fullmatch(k)}
    if not frozen:
      raise ValueError(f'adapter.params={self.pattern.pattern!r} matches no parameter; names look like '
                       f'{next(iter(flat), "?")!r}.')
    if len(frozen) == len(flat):
      raise ValueError(f'adapter.params={self.pattern.pattern!r} freezes every parameter; nothing would train.')
    return _nest({k: v for k, v in flat.items() if k not in frozen}), _nest(frozen)

  def merge(self, trainable: Params, base: Params) -> Params:
    return _nest({**_flat(base), **_flat(trainable)})

  def wrap(self, model):
    return model

  def export(self, trainable: Params, base: Params) -> Params:
    return self.merge(trainable, base)


ADAPTERS = {'none': NoAdapter, 'freeze': Freeze, 'lora': lora.Lora, 'qlora': lora.QLora}


def make_adapter(adapter_config: Mapping[str, Any] | None):
  """The adapter `adapter_config.name` names ('none' when absent), built with the config's other fields."""
  return build.from_registry('adapter', ADAPTERS, adapter_config, default='none')


def trainable_fraction(adapter, abstract_params: Params) -> float:
  """The trainable share of the model's parameter elements (for the weight-gradient part of training FLOPs)."""
  if isinstance(adapter, NoAdapter):
    return 1.0
  trainable, _ = adapter.split(abstract_params)
  return num_elements(trainable) / max(num_elements(abstract_params), 1)
