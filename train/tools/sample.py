r"""Prints a continuation of a prompt from a trained (or imported) language model in a workdir.

  python -m train.sample --workdir=workdirs/mistral_tiny --prompt="def main(" --max_new_tokens=200

Reads WORKDIR/config.json (written by the training loop) for the model and tokenizer, restores the latest
checkpoint's parameters (the EMA copy when the run kept one) and generates with the model's rolling KV
cache: greedy at --temperature=0, otherwise sampling with optional --top_k / --top_p.
"""
import json
import os
import sys

from absl import app, flags, logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module
  next to other commands' modules defines nothing twice)."""
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/).')
  flags.DEFINE_string('prompt', '', 'Text to continue.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate.')
  flags.DEFINE_float('temperature', 0.0, '0 for greedy decoding.')
  flags.DEFINE_integer('top_k', None, 'Sample among the k most likely tokens.')
  flags.DEFINE_float('top_p', None, 'Sample from the smallest nucleus of this probability.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')


def load(workdir: str, step: int | None = None):
  """(config, model, params, step) of a training workdir or a directory from `python -m train.convert import`.

  Only the parameters are read (the EMA copy when the run kept one); step is None for an imported model.
  """
  import jax.numpy as jnp
  from models import common
  from train import checkpoint, loop, paths
  path = os.path.join(workdir, 'config.json')
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'{path} not found: point --workdir at a directory written by `python -m train` '
                            'or `python -m train.convert import`.')
  config = ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
  model = loop.build_model(config)
  imported = epath.Path(workdir, 'params').is_dir()
  if not imported:
    with ocp.CheckpointManager(os.path.join(paths.absolute(workdir), 'checkpoints')) as manager:
      step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {workdir}/checkpoints: train first.')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        common.abstract_params(model, (1, 1), jnp.int32))
  key = 'ema_params' if (config.get('optimizer') or {}).get('ema_decay') else 'params'
  params = checkpoint.restore_params(workdir, target, step=step, key=key)
  return config, model, params, None if imported else step


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from data import tokenizers
  from models import mistral
  try:
    config, model, params, step = load(FLAGS.workdir, FLAGS.step)
    if not (config.get('data') or {}).get('tokenizer'):
      raise ValueError(f'{FLAGS.workdir} names no tokenizer (config.json data.tokenizer); an imported model '
                       'needs tokenizer.model in the source directory.')
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  prompt = [tokenizer.bos_id] + tokenizer.encode(FLAGS.prompt)
  tokens = mistral.generate(model, params, np.asarray([prompt], np.int32), FLAGS.max_new_tokens,
                            temperature=FLAGS.temperature, rng=jax.random.key(FLAGS.seed),
                            top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  new = [int(t) for t in np.asarray(tokens)[0, len(prompt):]]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  print(f'[{FLAGS.workdir}' + (f' at step {step}]' if step is not None else ' (imported)]'), file=sys.stderr)
  print(FLAGS.prompt + tokenizer.decode(new))


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  app.run(main)
