"""Things the config names: a model (`config.model_name`, a module under models/ whose `Model` is built with
`config.model`), an objective or an adapter (a `name` in a registry, built with the section's other fields).

The runtime's only door to models/: nothing else in train/ names a model.
"""
from collections.abc import Mapping
import importlib
import pkgutil
from typing import Any

import ml_collections


def model_kwargs(config) -> dict[str, Any]:
  return config.model.to_dict() if isinstance(config.model, ml_collections.ConfigDict) else dict(config.model)


def model_names() -> list[str]:
  """The models under models/: every module named without an underscore but the shared blocks (common). A
  model's helpers are MODEL_WHAT (mistral_weights, the converters; mistral_decode, generation) and define no
  Model."""
  import models
  return sorted(m.name for m in pkgutil.iter_modules(models.__path__) if m.name != 'common' and '_' not in m.name)


def model_module(config):
  """models.<config.model_name>, or a one-line ValueError naming the models there are."""
  available = model_names()
  if config.model_name not in available:
    raise ValueError(f'model_name={config.model_name!r} is not a model under models/; choose one of {available}.')
  module = importlib.import_module(f'models.{config.model_name}')
  if not hasattr(module, 'Model'):  # A new helper module that the naming rule above does not exclude.
    raise ValueError(f'models.{config.model_name} defines no Model; choose one of {available}.')
  return module


def build_model(config):
  """models.<model_name>.Model(**config.model)."""
  module = model_module(config)
  try:
    return module.Model(**model_kwargs(config))
  except TypeError as e:
    raise ValueError(f'config.model does not fit models.{config.model_name}.Model: {e}') from None


def from_registry(section: str, registry: Mapping[str, Any], fields: Mapping[str, Any] | None,
                  default: str | None = None):
  """registry[fields.name](**other fields), for the config section `section` (e.g. 'adapter'); fields left
  None are left out (the unset options of another entry). One-line ValueErrors for a bad name or field."""
  kwargs = dict(fields.to_dict() if hasattr(fields, 'to_dict') else fields or {})
  name = kwargs.pop('name', None) or default
  if name not in registry:
    raise ValueError(f'{section}.name={name!r} is unknown; choose one of {sorted(registry)}.')
  try:
    return registry[name](**{k: v for k, v in kwargs.items() if v is not None})
  except TypeError as e:
    raise ValueError(f'config.{section} does not fit {section} {name!r}: {e}') from None
