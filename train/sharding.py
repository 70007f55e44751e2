"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches."""
from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

# 'sequence' splits the token axis of every row (sequence parallelism: models whose module defines
# check_sequence_split, e.g. the Mistral decoder's sliding-window halo exchange); 1 everywhere else.
MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')
# Axes a config may leave out (older configs and saved runs): their size.
OPTIONAL_AXES = {'sequence': 1}
# The batch dimension is split over every axis that holds a different slice of the data.
BATCH_AXES = ('data', 'fsdp')


def mesh_text(shape: Mapping[str, int]) -> str:
  """'data=8 fsdp=1 tensor=1': the mesh's axes, leaving out an optional axis at its default."""
  return ' '.join(f'{name}={size}' for name, size in shape.items() if OPTIONAL_AXES.get(name) != size)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the per-axis device counts (-1 = all the rest) and checks they cover the devices."""
  missing = [name for name in MESH_AXES if name not in mesh_config and name not in OPTIONAL_AXES]
  if missing:
    raise ValueError(f'config.mesh has no {missing[0]!r} axis; give every one of {MESH_AXES} (-1: all the rest).')
  sizes = [int(mesh_config.get(name, OPTIONAL_AXES.get(name))) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1 (all the rest).')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: axis sizes must be positive or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide '
                       f'the {num_devices} devices; set --config.mesh.* to divisors of {num_devices}.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    axes = ' x '.join(f'{n}={s}' for n, s in zip(MESH_AXES, sizes) if OPTIONAL_AXES.get(n) != s)
    raise ValueError(f'mesh {axes} = {math.prod(sizes)} devices, '
                     f'but {num_devices} are available; set --config.mesh.* so the product is {num_devices} '
                     '(-1 means all the rest).')
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: GSPMD propagates shardings from the annotated parameters and batch.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(rules_config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  """`sharding_rules` (logical name -> mesh axes) as flax's rule list.

  Values are 'axis', 'axis1,axis2' or '' (replicated) in configs; None and tuples are accepted too.
  """
  rules = []
  for name, axes in dict(rules_config).items():
    if isinstance(axes, str):  # Config form: 'fsdp', 'data,fsdp', or '' for replicated.
      axes = tuple(a.strip() for a in axes.split(',') if a.strip())
      axes = axes[0] if len(axes) == 1 else (axes or None)
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'sharding_rules.{name} = {axes!r} names mesh axis {axis!r}; '
                         f'use None or one of {MESH_AXES}.')
    rules.append((name, axes))
  return tuple(rules)


def _logical_names(boxed_tree) -> set[str]:
  names = set()
  for leaf in jax.tree.leaves(boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    if isinstance(leaf, nn.LogicallyPartitioned):
      names.update(n for n in leaf.names if n is not None)
  return names


def param_shardings(boxed_abstract_params, mesh, rules):
  """NamedShardings of the (unboxed) parameters from their logical axis names and the rules."""
  missing = _logical_names(boxed_abstract_params) - {name for name, _ in rules}
  if missing:
    raise ValueError(f'parameters use logical axes {sorted(missing)} that have no entry in sharding_rules; '
                     f'add e.g. --config.sharding_rules.{sorted(missing)[0]}=None (replicated).')
  specs = nn.get_partition_spec(boxed_abstract_params)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  values = jax.tree.leaves(boxed_abstract_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  for (path, sharding), value in zip(jax.tree_util.tree_leaves_with_path(shardings), values):
    shape = (value.unbox(apply_constraint=False) if isinstance(value, nn.meta.AxisMetadata) else value).shape
    try:
      sharding.shard_shape(shape)
    except ValueError:  # jax's IndivisibleError, many lines long and naming no parameter
      raise ValueError(f'parameter {"/".join(_path_key(path))} of shape {tuple(shape)} cannot be split as '
                       f'{tuple(sharding.spec)} over the mesh {mesh_text(mesh.shape)}; change config.mesh or '
                       'config.sharding_rules.') from None
  return shardings


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def like_params(tree, params_abstract, params_shardings, mesh):
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose key path ends with a parameter's path and has its shape gets that parameter's sharding
  (momenta, EMA copies); anything else (step counters, scalars) is replicated.
  """
  by_path = {}
  for (path, sharding), leaf in zip(jax.tree_util.tree_leaves_with_path(params_shardings),
                                    jax.tree.leaves(params_abstract)):
    by_path[_path_key(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array per key (the same code on one or many hosts)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
