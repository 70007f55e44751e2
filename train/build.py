"""Models from configs: `config.model_name` names a module under models/, whose `Model` is built with `config.model`.

The runtime's only door to models/: nothing else in train/ names a model.
"""
import importlib
import pkgutil
from typing import Any

import ml_collections


def model_kwargs(config) -> dict[str, Any]:
  return config.model.to_dict() if isinstance(config.model, ml_collections.ConfigDict) else dict(config.model)


def model_module(config):
  """models.<config.model_name>, or a one-line ValueError naming the modules there are."""
  import models
  available = sorted(m.name for m in pkgutil.iter_modules(models.__path__))
  if config.model_name not in available:
    raise ValueError(f'model_name={config.model_name!r} is not a module under models/; choose one of {available}.')
  return importlib.import_module(f'models.{config.model_name}')


def build_model(config):
  """models.<model_name>.Model(**config.model)."""
  module = model_module(config)
  try:
    return module.Model(**model_kwargs(config))
  except TypeError as e:
    raise ValueError(f'config.model does not fit models.{config.model_name}.Model: {e}') from None
