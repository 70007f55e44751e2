"""Helpers shared by config files (imports nothing of ours but ml_collections)."""
import ast

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' (the part after ':' in --config=FILE:ARG) over typed defaults.

  Values are Python literals where they parse (1, 0.5, True, 'B/16' without quotes works too).
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config argument {item!r} is not key=value; e.g. --config=FILE:variant=B/16,runlocal=True')
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is unknown; this config takes {sorted(defaults)}.')
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    result[key] = type(defaults[key])(parsed) if defaults[key] is not None else parsed
  return result


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1) -> ml_collections.ConfigDict:
  """Devices per mesh axis; -1 means all the rest. `sequence` splits every row's tokens (sequence parallelism,
  for token models: the Mistral decoder)."""
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp, 'sequence': sequence, 'tensor': tensor})


def sharding_rules(**overrides) -> ml_collections.ConfigDict:
  """Logical axis name -> mesh axes, as strings so that any rule is a command-line override:
  'fsdp' (one axis), 'data,fsdp' (several), '' (replicated). FSDP shards weights over 'embed';
  tensor parallelism splits heads and the MLP hidden dimension; sequence parallelism the tokens of a row."""
  rules = {
      'batch': 'data,fsdp',
      'length': 'sequence',  # a no-op at the default sequence=1
      'act_embed': '',
      'embed': 'fsdp',
      'mlp': 'tensor',
      'heads': 'tensor',
      'head_dim': '',
      'classes': '',
      'layers': '',
      # Convolutions: output channels over fsdp (a no-op at the default fsdp=1), activations replicated.
      # Language models: the vocabulary and K/V heads split like the MLP and query heads.
      'vocab': 'tensor',
      'kv_heads': 'tensor',
      'conv_in': '',
      'conv_out': 'fsdp',
      'act_conv': '',
  }
  rules.update(overrides)
  return ml_collections.ConfigDict(rules)


def adamw(weight_decay: float = 1e-4, grad_clip_norm: float | None = 1.0, **kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
      # Decay matrices only: not biases, norm scales, embeddings of positions or the class token.
      weight_decay_params=r'.*kernel', grad_clip_norm=optional(float, grad_clip_norm),
      ema_decay=optional(float), ema_warmup=False) | kw)


def adapter(name: str = 'none', params: str | None = None, *, rank: int | None = None, alpha: float | None = None,
            dropout: float | None = None, rslora: bool | None = None,
            base_dtype: str | None = None) -> ml_collections.ConfigDict:
  """What trains: 'none' (everything), 'freeze' (`params`, a regex over parameter names, stays frozen), 'lora' or
  'qlora' (low-rank factors of `rank` on the kernels `params` matches, Mistral's seven projections when unset;
  scaled by alpha / rank, or alpha / sqrt(rank) with rslora; `dropout` on their input; `base_dtype`, e.g.
  'bfloat16', for the frozen base's unquantised floats). Unset fields take the adapter's defaults (train/lora.py)."""
  return ml_collections.ConfigDict(dict(
      name=name, params=optional(str, params), rank=optional(int, rank), alpha=optional(float, alpha),
      dropout=optional(float, dropout), rslora=optional(bool, rslora), base_dtype=optional(str, base_dtype)))


def schedule(base_learning_rate: float, warmup_steps: int, decay: str = 'cosine') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(base_learning_rate=base_learning_rate, warmup_steps=warmup_steps,
                                        decay=decay, end_learning_rate=0.0))


def optional(field_type, value=None):
  """A field that may be None yet stays overridable from the command line (e.g. data_dir)."""
  return config_dict.FieldReference(value, field_type=field_type)


def profile_steps(steps: tuple[int, int] | None = None):
  """config.profile_steps: (START, STOP) traces the steps START..STOP-1 with jax.profiler into WORKDIR/profile
  (TensorBoard's profile plugin, Perfetto); None: no trace. Every config has it, so that
  --config.profile_steps=10,15 works on any."""
  return optional(tuple, steps)


def minival_splits(split: str = 'train', percent: float = 10) -> tuple[str, str]:
  """(the rest of `split` to train on, a minival to choose hyperparameters on): its last `percent` held out by
  TFDS split slicing, e.g. ('train[:90%]', 'train[90%:]'). big_vision holds out train[99%:] of ImageNet,
  train[98%:] of CIFAR and train[90%:] of Pets and Flowers; the test split is then only reported.

  Deterministic and the same for every process count: the slice is of the split's record order, fixed when
  the dataset was prepared, and the training pipeline shuffles only within its part. TFDS rounds a percent
  boundary to the closest record ('closest' rounding): of the 1437 training digits, 90% is 1293.3, so
  train[:90%] holds 1293 and train[90%:] 144 (and train[99%:] 14). The two parts share that one boundary, so
  they are disjoint and together the whole split.
  """
  if '[' in split:
    raise ValueError(f'minival_splits: split={split!r} is already sliced; pass the whole split\'s name.')
  if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent < 100:
    raise ValueError(f'minival_splits: percent={percent!r} must be a number strictly between 0 and 100.')
  keep = f'{100 - percent:g}'
  return f'{split}[:{keep}%]', f'{split}[{keep}%:]'


# The compute-budget study (configs/convnets_at_scale.py, configs/vit_at_scale.py): dataset name ->
# (training images, classes, held-out split). JFT-4B is private: 'jft4b' is a tfds builder you provide.
STUDY_DATASETS = {'imagenet2012': (1_281_167, 1000, 'validation'), 'jft4b': (4_000_000_000, 30_000, 'test')}
STUDY_EPOCHS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def study_image_data(dataset: str, train_res: int, eval_res: int) -> ml_collections.ConfigDict:
  """The study's input pipeline: random-resized crops and flips only (the 2021 JFT recipe), pixels in [-1, 1]."""
  if dataset not in STUDY_DATASETS:
    raise ValueError(f'dataset {dataset!r} is unknown; use one of {sorted(STUDY_DATASETS)} (or add yours).')
  num_train, _, eval_split = STUDY_DATASETS[dataset]
  return ml_collections.ConfigDict(dict(
      name=dataset, data_dir=optional(str), train_split='train', eval_split=eval_split,
      pp_train=f'decode|inception_crop({train_res})|flip_lr|value_range(-1, 1)|keep("image", "label")',
      pp_eval=f'decode|resize({eval_res + 32})|central_crop({eval_res})|value_range(-1, 1)|keep("image", "label")',
      num_train_examples=num_train, num_threads=32, prefetch=4))


def study_held_out(data: ml_collections.ConfigDict, dataset: str) -> tuple[dict, str]:
  """(config.evals, the select_eval) of a study run: its learning rate is chosen on held-out data and its
  eval_split (evaluator `test`) is reported. ImageNet's validation split is the reported test, so a minival is
  carved out of training: train[99%:], big_vision's (`data` then trains on train[:99%]). JFT-4B's held-out set
  both chooses and is reported, as in the paper, whose reported number is the finetuned ImageNet top-1."""
  evals = {'test': {'split': data.eval_split}}
  if dataset != 'imagenet2012':
    return evals, 'test'
  data.train_split, minival = minival_splits('train', 1)
  data.num_train_examples = round(data.num_train_examples * 0.99)  # TFDS rounds the boundary to the closest.
  return {'minival': {'split': minival}, **evals}, 'minival'


def study_grid(models, epochs, learning_rates, **fixed) -> list[str]:
  """Config arguments of every (model, epochs, lr) run, with `fixed` arguments appended to each."""
  tail = ''.join(f',{k}={v}' for k, v in fixed.items())
  return [f'model={m},epochs={e},lr={lr}{tail}' for m in models for e in epochs for lr in learning_rates]
