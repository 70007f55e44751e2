r"""Prints a continuation of a prompt from a trained (or imported) language model in a workdir.

  python -m train.sample --workdir=workdirs/mistral_tiny --prompt="def main(" --max_new_tokens=200

Reads WORKDIR/config.json (written by the training loop) for the model and tokenizer, restores the latest
checkpoint's parameters (the EMA copy when the run kept one) and generates with the model's rolling KV
cache: greedy at --temperature=0, otherwise sampling with optional --top_k / --top_p.
"""
import sys

from absl import flags
import jax
import numpy as np

from train import cli
from train.tools import loader

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
  flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  cli.quiet_logging()
  from data import tokenizers
  from models import mistral
  with cli.failing_on(FileNotFoundError, ValueError):
    run = loader.load_run(FLAGS.workdir, FLAGS.step)
    config, model, params, step = run.config, run.model, run.params, run.step
    if not (config.get('data') or {}).get('tokenizer'):
      raise ValueError(f'{FLAGS.workdir} names no tokenizer (config.json data.tokenizer); an imported model '
                       'needs tokenizer.model in the source directory.')
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
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
  cli.run(sys.modules[__name__])
