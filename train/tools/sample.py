r"""Prints a continuation of a prompt from a trained (or imported) language model in a workdir.

  python -m train.sample --workdir=workdirs/mistral_tiny --prompt="def main(" --max_new_tokens=200
  python -m train.sample --workdir=workdirs/mistral_sft --chat="What does \`textwrap.dedent\` do?"

Reads WORKDIR/config.json (written by the training loop) for the model and tokenizer, restores the latest
checkpoint's parameters (the EMA copy when the run kept one) and generates with the model's rolling KV
cache (its module's `generate`).

Sampling by default, at temperature 0.8 within the top-p 0.95 nucleus: greedy decoding (--temperature=0)
makes a small or briefly trained model repeat itself (`def main(self.________...`); a temperature below 1
still favours likely tokens, and the nucleus drops the long tail of unlikely ones that turns text into noise.
The output is reproducible for a given --seed.
"""
import sys

from absl import flags
import jax
import numpy as np

from train import cli
from train.tools import loader

FLAGS = flags.FLAGS
TEMPERATURE = 0.8  # The defaults, and why: see the module docstring.
TOP_P = 0.95


def define_flags() -> None:
  """The command line flags (defined only when run as a command, so that importing this module
  next to other commands' modules defines nothing twice)."""
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/) or an imported model.')
  flags.DEFINE_string('prompt', '', 'Text to continue.')
  flags.DEFINE_string('chat', None, 'A user message: wrapped in the run\'s chat template (data.template; zephyr '
                      'when the run has none) with the assistant\'s turn opened; the reply is printed.')
  flags.DEFINE_string('system', None, 'With --chat: a system message before it.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate (at least 1).')
  flags.DEFINE_float('temperature', TEMPERATURE, 'Softmax temperature; 0 for greedy decoding. Below 1 favours '
                     'likely tokens while avoiding the loops that greedy decoding falls into.')
  flags.DEFINE_integer('top_k', None, 'Sample among the k most likely tokens (k >= 1; default: all).')
  flags.DEFINE_float('top_p', TOP_P, 'Sample from the smallest set of tokens whose probability reaches p, in '
                     '(0, 1]; 1 keeps every token. The default drops the unlikely tail that derails a small model.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.mark_flag_as_required('workdir')


check_options = loader.check_sampling  # The names this module always offered.
language_model = loader.language_model


def continuation(run, module, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = TEMPERATURE,
                 top_k: int | None = None, top_p: float | None = TOP_P, seed: int = 0,
                 tokens: list[int] | None = None) -> str:
  """The text `run`'s model writes after `prompt` (or after the token ids `tokens`), up to its end-of-sequence
  token."""
  tokens = list(tokens) if tokens is not None else [tokenizer.bos_id] + tokenizer.encode(prompt)
  out = module.generate(run.model, run.params, np.asarray([tokens], np.int32), max_new_tokens,
                        temperature=temperature, rng=jax.random.key(seed), top_k=top_k, top_p=top_p)
  new = [int(t) for t in np.asarray(out)[0, len(tokens):]]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return tokenizer.decode(new)


def chat_prompt(config, tokenizer, message: str, system: str | None = None) -> list[int]:
  """Token ids of a user `message` (after an optional `system` one) in the run's chat template, ending where the
  assistant's reply begins."""
  from data import chat
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': message}]
  template = (config.get('data') or {}).get('template') or 'zephyr'
  tokens, _ = chat.encode(messages, tokenizer, template, add_generation_prompt=True)
  return [int(t) for t in tokens]


def main(argv):
  cli.no_arguments(argv, 'the text to continue goes in --prompt="..." (or a user message in --chat="...")')
  cli.quiet_logging()
  from data import tokenizers
  with cli.failing_on(FileNotFoundError, ValueError):
    check_options(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    config, module = language_model(FLAGS.workdir)
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    tokens = chat_prompt(config, tokenizer, FLAGS.chat, FLAGS.system) if FLAGS.chat is not None else None
    run = loader.load_run(FLAGS.workdir, FLAGS.step)
  text = continuation(run, module, tokenizer, FLAGS.prompt, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                      top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, tokens=tokens)
  print(f'[{FLAGS.workdir}' + (f' at step {run.step}]' if run.step is not None else ' (imported)]'), file=sys.stderr)
  print(text if tokens is not None else FLAGS.prompt + text)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
