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
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 for greedy decoding.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Sample among the k most likely tokens.')
_TOP_P = flags.DEFINE_float('top_p', None, 'Sample from the smallest nucleus of this probability.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')


def load(workdir: str, step: int | None = None):
  """(config, model, params, step) of the run in `workdir`."""
  from train import loop
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: point --workdir at a directory written by `python -m train`.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints')) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {workdir}/checkpoints: train first.')
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  return config, loop.build_model(config), state.get('ema_params') or state['params'], step


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from data import tokenizers
  from models import mistral
  try:
    config, model, params, step = load(_WORKDIR.value, _STEP.value)
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  prompt = [tokenizer.bos_id] + tokenizer.encode(_PROMPT.value)
  tokens = mistral.generate(model, params, np.asarray([prompt], np.int32), _MAX_NEW.value,
                            temperature=_TEMPERATURE.value, rng=jax.random.key(_SEED.value),
                            top_k=_TOP_K.value, top_p=_TOP_P.value)
  new = [int(t) for t in np.asarray(tokens)[0, len(prompt):]]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  print(f'[{_WORKDIR.value} at step {step}]', file=sys.stderr)
  print(_PROMPT.value + tokenizer.decode(new))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
