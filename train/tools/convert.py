r"""Imports Hugging Face (or original-release) Mistral weights into an orbax checkpoint, and exports back.

  python -m train.convert import --src=/models/Mistral-7B-v0.1 --out=imported/mistral_7b --scan
  python -m train.convert import --src=/models/mistral-7B-v0.1 --format=original --rope_theta=10000 \
      --out=imported/mistral_7b --scan
  python -m train.convert export --src=workdirs/mistral_7b --out=/models/my-mistral --dtype=bfloat16
  python -m train.convert export_peft --src=workdirs/mistral_sft_lora --out=/models/my-lora   # peft adapter

Import reads `config.json` + `model.safetensors` (or the shards of `model.safetensors.index.json`), or,
with --format=original, `params.json` + `consolidated*.safetensors` / `consolidated.*.pth` (query and key
rows permuted from adjacent-pair to half-split RoPE). Tensors are read one at a time from memory-mapped
shards and written into one preallocated parameter tree, so a 7B model is held once, in its stored
dtype unless --dtype says otherwise. OUT gets `params/` (orbax), `config.json` (the model kwargs) and
the tokenizer.model if SRC has one. Then:

  python -m train --config=configs/mistral_7b.py:init=imported/mistral_7b --workdir=...   # finetune
  python -m train.sample --workdir=imported/mistral_7b --prompt="..."                       # sample

Export takes an imported directory or a training workdir (its latest checkpoint's parameters, never
the optimizer state) and writes config.json + safetensors shards + model.safetensors.index.json that
`transformers.MistralForCausalLM.from_pretrained` loads. From a LoRA or QLoRA run, `export` writes the merged
weights (each kernel + alpha/r * A @ B, a QLoRA base dequantised) and `export_peft` the adapter alone, as peft
saves one (adapter_config.json + adapter_model.safetensors), to load onto the exported base model.
"""
import glob
import json
import os
import sys

from absl import flags
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from train import adapters, cli
from train.tools import loader

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module
  next to other commands' modules defines nothing twice)."""
  flags.DEFINE_string('src', None, 'import: HF or original model directory; export: imported dir or workdir.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_enum('format', 'hf', ['hf', 'original'], 'import: layout of --src.')
  flags.DEFINE_bool('scan', False, 'import: stack layers for Model(scan=True), as the pod configs use.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Stored dtype (default: keep).')
  flags.DEFINE_float('rope_theta', None, 'import --format=original: when params.json has none.')
  flags.DEFINE_integer('checkpoint_step', None, 'export from a workdir: its checkpoint step (default latest).')
  flags.DEFINE_integer('max_shard_bytes', 5 * 2**30, 'export: bytes per safetensors shard.')


MODEL_NAME = 'mistral'


def _tensor_files(src: str, fmt: str) -> list[str]:
  if fmt == 'hf':
    index = os.path.join(src, 'model.safetensors.index.json')
    if os.path.exists(index):
      weight_map = _load_json(index).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ValueError(f'{index} has no weight_map object; replace it with the released index.')
      return [os.path.join(src, n) for n in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(src, 'model*.safetensors')))
  else:
    files = sorted(glob.glob(os.path.join(src, 'consolidated*.safetensors'))) or sorted(
        glob.glob(os.path.join(src, 'consolidated*.pth')))
  if not files:
    want = 'model*.safetensors' if fmt == 'hf' else 'consolidated*.safetensors or consolidated*.pth'
    raise FileNotFoundError(f'no {want} in {src}; pass the model directory as --src (and --format).')
  return files


def _read_tensors(path: str):
  """Yields (name, numpy array) one at a time; the file stays memory-mapped, never loaded whole."""
  if path.endswith('.safetensors'):
    from safetensors import safe_open
    with safe_open(path, framework='np') as f:
      for name in f.keys():
        yield name, f.get_tensor(name)
  else:
    import torch  # Only the original .pth release needs it.
    state = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    for name in list(state):
      tensor = state.pop(name)
      if tensor.dtype == torch.bfloat16:
        yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      else:
        yield name, tensor.numpy()


def _load_json(path: str) -> dict:
  """The JSON object in `path`; one-line errors that name the file when it is missing or not such an object."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'{path} not found; --src must be a model directory with its config.')
  try:
    record = json.loads(epath.Path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); replace it with the file the model was released '
                     'with.') from None
  if not isinstance(record, dict):
    raise ValueError(f'{path} holds a JSON {type(record).__name__}, not an object of settings; replace it with '
                     'the file the model was released with.')
  return record


def _model_kwargs(hf_config: dict, path: str) -> dict:
  from models import mistral_weights
  try:
    return mistral_weights.model_kwargs_from_hf(hf_config)
  except KeyError as e:
    raise ValueError(f'{path} lacks {e}; is it the config of a Mistral model?') from None
  except (TypeError, ValueError) as e:  # A field of the wrong type, e.g. a string where a number belongs.
    raise ValueError(f'{path} has a bad value: {e}.') from None


def import_model(src: str, out: str, *, fmt: str = 'hf', scan: bool = False, dtype: str | None = None,
                 rope_theta: float | None = None) -> dict:
  """Streams SRC's tensors (a local directory: they are memory-mapped) into OUT/params (local or gs://);
  returns the model kwargs written to OUT/config.json."""
  from models import common, mistral, mistral_weights
  from train import checkpoint, paths
  config_file = os.path.join(src, 'config.json' if fmt == 'hf' else 'params.json')
  if fmt == 'hf':
    hf_config = _load_json(config_file)
  else:
    try:
      hf_config = mistral_weights.hf_config_from_original(_load_json(config_file), rope_theta)
    except KeyError as e:
      raise ValueError(f'{config_file} lacks {e}; is it the params.json of a Mistral release?') from None
  kwargs = _model_kwargs(hf_config, config_file)
  kwargs['scan'] = scan
  shapes = common.abstract_params(mistral.Model(**kwargs), (1, 1), jnp.int32)
  params, filled = None, set()
  for path in _tensor_files(src, fmt):
    for name, array in _read_tensors(path):
      if fmt == 'original':
        name, array = mistral_weights.original_tensor_to_hf(name, array, kwargs['head_dim'])
      converted = mistral_weights.hf_tensor_to_param(name, array, kwargs)
      if converted is None:
        continue
      key, value = converted
      if params is None:  # One tree in the first tensor's dtype, allocated once.
        target = np.dtype(dtype or value.dtype)
        params = jax.tree.map(lambda s: np.empty(s.shape, target), shapes)
      layer = None
      if scan and key[0].startswith('layer_'):
        layer, key = int(key[0][len('layer_'):]), ('layers', *key[1:])
      node = params
      for k in key[:-1]:
        node = node[k]
      dest = node[key[-1]] if layer is None else node[key[-1]][layer]
      if dest.shape != value.shape:
        raise ValueError(f'{name} has shape {value.shape} but the config implies {dest.shape}; '
                         'is the config.json/params.json the one of these weights?')
      dest[...] = value
      filled.add(name)
  missing = sorted(set(mistral_weights.hf_names(kwargs)) - filled)
  if missing:
    raise ValueError(f'{len(missing)} tensors missing from {src}, e.g. {missing[:3]}; are all shards there?')
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  checkpoint.save_params(out, params)
  tokenizer = os.path.join(src, 'tokenizer.model')
  if os.path.exists(tokenizer):
    epath.Path(tokenizer).copy(epath.Path(out, 'tokenizer.model'), overwrite=True)
  # example_input: what the parameter shapes were derived from (the run loader rebuilds them from it).
  record = {'model_name': MODEL_NAME, 'model': kwargs, 'imported_from': os.path.abspath(src),
            'example_input': {'shape': [1, 1], 'dtype': 'int32'},
            'data': {'tokenizer': paths.absolute(os.path.join(out, 'tokenizer.model'))
                     if os.path.exists(tokenizer) else None}}
  epath.Path(out, 'config.json').write_text(json.dumps(record, indent=2))
  return kwargs


def load_params(src: str, step: int | None = None):
  """(model kwargs, numpy params) of an imported directory or a training workdir (EMA copy if kept)."""
  run = loader.load_run(src, step)
  config, params = run.config, run.params
  if config.get('model_name') != MODEL_NAME:
    raise ValueError(f"{src} holds model_name={config.get('model_name')!r}; only {MODEL_NAME!r} exports to HF.")
  return config.model.to_dict(), jax.tree.map(np.asarray, params)


def export_model(src: str, out: str, *, step: int | None = None, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes OUT/config.json, OUT/model-0000i-of-0000n.safetensors and the index; returns the shard paths.

  SRC may be on gs://; OUT is local (safetensors writes files by name).
  """
  from safetensors.numpy import save_file
  from models import mistral_weights
  from train import paths
  if paths.is_url(out):
    raise ValueError(f'--out={out}: export writes a local directory (safetensors writes local files); copy it to '
                     'the bucket afterwards, e.g. with gcloud storage cp -r.')
  kwargs, params = load_params(src, step)
  if 'layers' in params:  # Per-layer views of the stacked arrays, no copy.
    params = mistral_weights.unstack_layers(params)
  cast = (lambda a: a.astype(dtype)) if dtype else (lambda a: a)
  tensors = [(path, value) for path, value in mistral_weights.flat_params(params)]
  shards, size = [[]], 0
  for path, value in tensors:  # Plan the shards first: their count is in every file name.
    nbytes = value.size * np.dtype(dtype or value.dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((path, value))
    size += nbytes
  os.makedirs(out, exist_ok=True)
  weight_map, total, files = {}, 0, []
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    converted = {}
    for path, value in shard:
      name, array = mistral_weights.param_to_hf_tensor(path, value)
      converted[name] = np.ascontiguousarray(cast(array))
      weight_map[name] = file
      total += converted[name].nbytes
    save_file(converted, os.path.join(out, file), metadata={'format': 'pt'})
    files.append(os.path.join(out, file))
    del converted
  with open(os.path.join(out, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  config = mistral_weights.hf_config_from_kwargs(kwargs)
  config['torch_dtype'] = dtype or str(np.asarray(tensors[0][1]).dtype)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  tokenizer = epath.Path(src, 'tokenizer.model')
  if tokenizer.exists():
    tokenizer.copy(epath.Path(out, 'tokenizer.model'), overwrite=True)
  return files


# Our projection -> the HF module peft adapts (Mistral).
_PEFT_MODULES = {'attn/query': 'self_attn.q_proj', 'attn/key': 'self_attn.k_proj', 'attn/value': 'self_attn.v_proj',
                 'attn/out': 'self_attn.o_proj', 'mlp/gate': 'mlp.gate_proj', 'mlp/up': 'mlp.up_proj',
                 'mlp/down': 'mlp.down_proj'}


def export_peft(src: str, out: str, *, step: int | None = None) -> dict:
  """A LoRA workdir's adapter as peft writes one: OUT/adapter_config.json and OUT/adapter_model.safetensors,
  loadable with peft.PeftModel.from_pretrained onto the HF model `export` writes from the run's base. Each
  lora_a [in..., r] becomes lora_A.weight [r, in] and lora_b [r, out...] lora_B.weight [out, r], flattened as
  `export` flattens their kernel. Returns the adapter config."""
  from train import paths, runs
  if paths.is_url(out):
    raise ValueError(f'--out={out}: export writes a local directory; copy it to the bucket afterwards.')
  config, trainable = runs.restore_trainable(src, step)
  adapter = config.get('adapter') or {}
  if adapter.get('name') not in ('lora', 'qlora') or config.get('model_name') != MODEL_NAME:
    raise ValueError(f'{src} was not trained with a LoRA adapter on {MODEL_NAME!r} (adapter {adapter.get("name")!r}, '
                     f'model {config.get("model_name")!r}); export its merged weights with `export` instead.')
  return write_peft(trainable, adapters.make_adapter(adapter), out)


def write_peft(trainable, adapter, out: str) -> dict:
  """`export_peft`'s writer: the LoRA factors `trainable` (our names and layout) of `adapter` into OUT."""
  from safetensors.numpy import save_file
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, trainable), sep='/')
  tensors, targets = {}, set()
  for name, value in sorted(flat.items()):
    module, factor = name.rsplit('/', 1)
    layer, inner = module.split('/', 1)
    layers = list(enumerate(value)) if layer == 'layers' else [(int(layer[len('layer_'):]), value)]
    hf_module = _PEFT_MODULES[inner]
    targets.add(hf_module.split('.')[-1])
    for i, v in layers:
      weight = v.reshape(-1, adapter.rank).T if factor == 'lora_a' else v.reshape(adapter.rank, -1).T
      kind = 'lora_A' if factor == 'lora_a' else 'lora_B'
      tensors[f'base_model.model.model.layers.{i}.{hf_module}.{kind}.weight'] = np.ascontiguousarray(weight)
  peft_config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': adapter.rank, 'lora_alpha': adapter.alpha,
                 'lora_dropout': adapter.dropout, 'use_rslora': adapter.rslora, 'target_modules': sorted(targets),
                 'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True, 'init_lora_weights': True,
                 'base_model_name_or_path': None, 'modules_to_save': None}
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, 'adapter_model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(out, 'adapter_config.json'), 'w') as f:
    json.dump(peft_config, f, indent=2)
  return peft_config


def main(argv):
  if len(argv) != 2 or argv[1] not in ('import', 'export', 'export_peft'):
    cli.fail('usage: python -m train.convert import|export|export_peft --src=DIR --out=DIR [flags]')
  cli.quiet_logging()
  if not FLAGS.src or not FLAGS.out:
    cli.fail('--src and --out are both required.')
  with cli.failing_on(FileNotFoundError, ValueError, KeyError):
    if argv[1] == 'import':
      kwargs = import_model(FLAGS.src, FLAGS.out, fmt=FLAGS.format, scan=FLAGS.scan, dtype=FLAGS.dtype,
                            rope_theta=FLAGS.rope_theta)
      print(f'imported {FLAGS.src} -> {FLAGS.out}: {kwargs}')
    elif argv[1] == 'export_peft':
      peft_config = export_peft(FLAGS.src, FLAGS.out, step=FLAGS.checkpoint_step)
      print(f'exported the LoRA adapter of {FLAGS.src} -> {FLAGS.out} (peft format: rank {peft_config["r"]}, '
            f'{", ".join(peft_config["target_modules"])})')
    else:
      files = export_model(FLAGS.src, FLAGS.out, step=FLAGS.checkpoint_step, dtype=FLAGS.dtype,
                           max_shard_bytes=FLAGS.max_shard_bytes)
      print(f'exported {FLAGS.src} -> {FLAGS.out}: {len(files)} safetensors shard(s)')


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
