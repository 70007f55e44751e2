"""The tools' one loader of a run: `load_run(path)` gives config, model and the parameters a user evaluates.

For any model: a training workdir (its latest or a given checkpoint; the adapter's frozen base merged back in,
the EMA copy when the run kept one: train/runs.py and train/state.py decide) or a directory from
`python -m train.convert import`. The parameters are shaped by the example input the run was initialised on;
`input_shape` asks for another one (a ViT at a new resolution): a model module that can adapt its parameters
to it offers `adapt_params(params, target_shapes, model_kwargs)` (ViT resamples its position embedding), and the
loader calls it without knowing which model it is. `train.sample` and `train.convert export` use it.

The text tools (sample, generate, judge) share two checks here, the one module they may all import:
`language_model(path)` (does the path hold a model that writes text, with a tokenizer?) and `check_sampling`.
"""
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from train import build, paths, runs


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  model: Any
  params: Any           # the whole model's evaluated parameters
  step: int | None      # None for an imported model
  example_input: jax.ShapeDtypeStruct  # what the parameters are shaped for (batch of one)


def _recorded_example(path: str, config, step: int | None) -> jax.ShapeDtypeStruct:
  """The example input a workdir's checkpoint (or an imported model's config.json) records."""
  if step is None:
    spec = config.get('example_input')
  else:
    with ocp.CheckpointManager(os.path.join(paths.absolute(path), 'checkpoints')) as manager:
      spec = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'].get('example_input')
  if not spec:
    raise ValueError(f'{path} records no example_input (written by older code); retrain or re-import it.')
  spec = spec.to_dict() if hasattr(spec, 'to_dict') else spec
  return jax.ShapeDtypeStruct(tuple(spec['shape']), jnp.dtype(spec['dtype']))


def _shapes(model, example: jax.ShapeDtypeStruct, sharding):
  boxed = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, jnp.zeros(example.shape, example.dtype)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      nn.meta.unbox(boxed['params']))


def load_run(path: str, step: int | None = None, *, input_shape: tuple[int, ...] | None = None,
             model_overrides: dict[str, Any] | None = None) -> Run:
  """The run in `path` at `step` (default: the latest), for inputs of `input_shape` (with the batch axis;
  default: the run's own), its model built with `model_overrides` (e.g. dtype) over the recorded kwargs."""
  config = runs.read_config(path)
  if model_overrides:
    config.model.update(model_overrides)
  model = build.build_model(config)
  step = None if runs.is_imported(paths.absolute(path)) else runs.latest_step(path, step)
  recorded = _recorded_example(path, config, step)
  example = recorded if input_shape is None else jax.ShapeDtypeStruct(tuple(input_shape), recorded.dtype)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = _shapes(model, example, device)
  stored = _shapes(model, recorded, device)
  if jax.tree.map(lambda t: t.shape, target) == jax.tree.map(lambda s: s.shape, stored):
    params = runs.restore_params(path, target, step=step)
  else:  # Another input shape changed some parameters' shapes: the model's own hook adapts them.
    adapt = getattr(build.model_module(config), 'adapt_params', None)
    if adapt is None:
      raise ValueError(f'models.{config.model_name} has parameters of other shapes at input {example.shape} '
                       f'than at {recorded.shape}, and no adapt_params hook to resample them.')
    params = adapt(runs.restore_params(path, stored, step=step), target, build.model_kwargs(config))
  return Run(config=config, model=model, params=params, step=step, example_input=example)


def load(workdir: str, step: int | None = None):
  """(config, model, params, step): `load_run` as a tuple, as train.sample.load always gave it."""
  run = load_run(workdir, step)
  return run.config, run.model, run.params, run.step


def language_model(path: str):
  """(config, the model's module) of the run or imported model in `path`, read from its config.json before
  anything is restored; ValueError when it holds no model that generates text with a tokenizer."""
  config = runs.read_config(path)
  module = build.model_module(config)
  if not hasattr(module, 'generate'):
    raise ValueError(f'{path} holds a {config.model_name!r} model, which does not generate text; point '
                     '--workdir at a language model\'s workdir (e.g. one of configs/mistral_tiny.py).')
  if not (config.get('data') or {}).get('tokenizer'):
    raise ValueError(f'{path} names no tokenizer (config.json data.tokenizer); an imported model needs '
                     'tokenizer.model in the source directory.')
  return config, module


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
  """ValueError, one line, for sampling options out of range."""
  if max_new_tokens < 1:
    raise ValueError(f'--max_new_tokens={max_new_tokens}: generate at least 1 token.')
  if not temperature >= 0:
    raise ValueError(f'--temperature={temperature} must be >= 0 (0 for greedy decoding).')
  if top_k is not None and top_k < 1:
    raise ValueError(f'--top_k={top_k} must be at least 1 (leave it unset to keep every token).')
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'--top_p={top_p} must be in (0, 1] (1 keeps every token).')
