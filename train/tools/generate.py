r"""Writes K sampled replies of a language model to every prompt of a JSONL file, batched, resumable.

  python -m train.generate --workdir=workdirs/mistral_sft --prompts=prompts.jsonl --out=replies.jsonl \
      --num_samples=4
  python -m train.generate --workdir=workdirs/mistral_sft --prompts=prompts.jsonl --out=greedy.jsonl \
      --temperature=0 --max_new_tokens=512

--workdir is a training workdir or an imported model (as for train.sample); the prompts are rendered in its
chat template (config data.template, zephyr when it has none) with the assistant's turn opened, and tokenized
with its data.tokenizer.

Prompt rows (--prompts, JSONL): `{"prompt": "text"}` (one user message) or `{"messages": [...]}` (a
conversation; trailing assistant messages are dropped, so a chat dataset file serves as prompts, and it must
then end with a user message), with an optional "prompt_id" (default: a hash of the prompt's messages). A
prompt whose tokens reach --max_length (default: the run's data.seq_len or data.max_length; unlimited
without) is skipped and counted, and a reply is cut where it would pass it; a repeated prompt_id with the
same prompt is skipped and counted, with another prompt it is an error.

Output rows (--out, JSONL, chat-shaped), one per (prompt, sample k in 0..K-1): `{"prompt_id", "prompt" (the
last user message), "messages": [prompt messages..., {"role": "assistant", "content": reply}], "sample",
"source" (--source, default the workdir's name), "temperature", "top_p", "top_k", "seed", "step" (null for
an imported model), "max_new_tokens", "tokenizer", "finished" (the reply ended with EOS), "num_tokens" (the
tokens generated, EOS included)}`. The reply is the text before EOS.

Determinism and resume: sample k of a prompt is drawn with a key made from (--seed, prompt_id, k) only, and
every row is generated as if alone (models.mistral.generate's per-row keys), so batching does not change a
sample. Prompts are batched shortest first (little padding) and each batch's rows are appended in the prompt
file's order, then flushed. A rerun with the same options reads --out, drops a partial last line (a kill
mid-write) and generates only the rows missing, so a killed and rerun command leaves the same file as one
that was never interrupted. Rows written with other options are an error: pass another --out.
"""
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

from absl import flags
import jax
import numpy as np

from train import cli
from train.tools import loader

FLAGS = flags.FLAGS
MIN_WIDTH = 64  # Batches are padded to a power of two of at least this many tokens: one compile per width.
PROGRESS_EVERY_S = 30.0


def define_flags() -> None:
  """The command line flags (defined only when run as a command)."""
  flags.DEFINE_string('workdir', None, 'A language model\'s training workdir or imported model.')
  flags.DEFINE_string('prompts', None, 'Prompts, JSONL: {"prompt": text} or {"messages": [...]}, optional '
                      '"prompt_id".')
  flags.DEFINE_string('out', None, 'Output JSONL, one row per (prompt, sample); appended to on a rerun.')
  flags.DEFINE_integer('num_samples', 1, 'Replies per prompt (K >= 1).')
  flags.DEFINE_integer('max_new_tokens', 256, 'Most tokens per reply (at least 1).')
  flags.DEFINE_float('temperature', 0.7, 'Softmax temperature; 0 for greedy decoding.')
  flags.DEFINE_float('top_p', 0.95, 'Nucleus: sample from the smallest set of tokens whose probability reaches '
                     'p, in (0, 1]; 1 keeps every token.')
  flags.DEFINE_integer('top_k', None, 'Sample among the k most likely tokens (default: all).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed; with prompt_id and k it makes each sample\'s key.')
  flags.DEFINE_integer('batch_size', 16, 'Sequences (prompt, sample) per generation call.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('source', None, 'The rows\' "source" (default: the workdir\'s name).')
  flags.DEFINE_integer('max_length', None, 'Tokens of prompt and reply together (default: the run\'s '
                       'data.seq_len or data.max_length; unlimited when it has neither).')
  for name in ('workdir', 'prompts', 'out'):
    flags.mark_flag_as_required(name)


def check_options(num_samples: int, max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, batch_size: int, max_length: int | None) -> None:
  """ValueError, one line, for options out of range."""
  if num_samples < 1:
    raise ValueError(f'--num_samples={num_samples}: ask for at least 1 sample per prompt.')
  loader.check_sampling(max_new_tokens, temperature, top_k, top_p)
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size} must be at least 1.')
  if max_length is not None and max_length < 2:
    raise ValueError(f'--max_length={max_length} must be at least 2 (a prompt token and a reply token).')


# Prompts.

@dataclasses.dataclass
class Prompt:
  index: int                  # its place in the prompt file
  where: str                  # FILE:LINE
  prompt_id: Any              # str or int, as given (or the hash of the messages)
  messages: list[dict[str, str]]
  tokens: list[int] = dataclasses.field(default_factory=list)

  @property
  def id_key(self) -> str:
    return json.dumps(self.prompt_id)  # 1 and '1' stay apart


def prompt_hash(messages) -> str:
  """The default prompt_id: a hash of the prompt's messages (train.judge computes the same)."""
  return hashlib.sha256(json.dumps(messages, sort_keys=True).encode('utf-8')).hexdigest()[:16]


def parse_prompt(line: str, where: str) -> tuple[Any, list[dict[str, str]]]:
  """(prompt_id, messages) of one prompt-file line; ValueError starting with `where` otherwise."""
  from data import chat
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line.') from None
  if not isinstance(record, dict) or not ('messages' in record or 'prompt' in record):
    raise ValueError(f'{where}: expected an object with "prompt" (a user message) or "messages" (a conversation).')
  if 'messages' in record:  # A chat dataset row may have both; its messages are the conversation.
    messages = chat.validate(record['messages'], where)
    while messages and messages[-1]['role'] == 'assistant':
      messages.pop()
    if not messages or messages[-1]['role'] != 'user':
      raise ValueError(f'{where}: the conversation must end with a user message (after its trailing assistant '
                       'messages are dropped) for the model to reply to.')
  elif isinstance(record['prompt'], str):
    messages = [{'role': 'user', 'content': record['prompt']}]
  else:
    raise ValueError(f'{where}: "prompt" must be a string, got {type(record["prompt"]).__name__}.')
  prompt_id = record.get('prompt_id')
  if prompt_id is None:
    prompt_id = prompt_hash(messages)
  elif isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
    raise ValueError(f'{where}: "prompt_id" must be a string or an integer, got {prompt_id!r}.')
  return prompt_id, messages


def read_prompts(path: str) -> tuple[list[Prompt], int]:
  """The prompt file's prompts in order, and how many repeated an earlier prompt_id (dropped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--prompts={path} does not exist; point it at a JSONL file of prompts.')
  prompts, seen, repeated = [], {}, 0
  with open(path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      prompt_id, messages = parse_prompt(line, where)
      p = Prompt(len(prompts), where, prompt_id, messages)
      first = seen.setdefault(p.id_key, p)
      if first is not p:
        if first.messages != messages:
          raise ValueError(f'{where}: prompt_id {prompt_id!r} was given to another prompt at {first.where}; '
                           'give each prompt its own id.')
        repeated += 1
        continue
      prompts.append(p)
  return prompts, repeated


# Output.

def read_written(out: str, settings: dict) -> tuple[set[tuple[str, int]], int]:
  """(the (prompt id key, sample) pairs already in `out`, the byte size of its complete lines). A row
  written with other `settings` is a ValueError naming OUT:LINE."""
  if not os.path.exists(out):
    return set(), 0
  with open(out, 'rb') as f:
    data = f.read()
  end = data.rfind(b'\n') + 1  # What follows the last newline is a row cut short by a kill.
  done = set()
  for number, line in enumerate(data[:end].split(b'\n')[:-1], 1):
    try:
      row = json.loads(line)
      key = (json.dumps(row['prompt_id']), int(row['sample']))
    except (ValueError, KeyError, TypeError):
      raise ValueError(f'{out}:{number}: not a row of train.generate; pass another --out.') from None
    for name, value in settings.items():
      if row.get(name) != value:
        raise ValueError(f'{out}:{number} was written with {name}={row.get(name)!r}, not {value!r}; pass another '
                         '--out, or the options it was written with to complete it.')
    done.add(key)
  return done, end


def _append(out: str, rows: list[dict]) -> None:
  text = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
  with open(out, 'a', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


# Generation.

def plan(prompts: list[Prompt], num_samples: int, batch_size: int) -> list[list[tuple[Prompt, int]]]:
  """Batches of (prompt, sample): prompts shortest first, each batch in the prompt file's order. Depends only
  on the prompts, so a rerun batches exactly as the first run did."""
  order = sorted(prompts, key=lambda p: (len(p.tokens), p.index))
  rows = [(p, k) for p in order for k in range(num_samples)]
  batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
  return [sorted(b, key=lambda r: (r[0].index, r[1])) for b in batches]


@jax.jit
def _fold(base, words, samples):
  one = lambda w, k: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, w[0]), w[1]), k)
  return jax.vmap(one)(words, samples)


def sample_keys(seed: int, rows: list[tuple[Prompt, int]]) -> jax.Array:
  """One key per (prompt, sample), from (seed, prompt_id, sample) only."""
  words = [np.frombuffer(hashlib.sha256(p.id_key.encode('utf-8')).digest()[:8], np.uint32) for p, _ in rows]
  return _fold(jax.random.key(seed), np.stack(words), np.asarray([k for _, k in rows], np.uint32))


def _width(n: int) -> int:
  return max(MIN_WIDTH, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class Job:
  """Everything a generation needs, checked: see `prepare`."""
  run: Any                    # loader.Run
  module: Any                 # the model's module (its generate)
  tokenizer: Any
  prompts: list[Prompt]       # those that fit, in file order
  out: str
  options: dict               # num_samples, max_new_tokens, temperature, top_k, top_p, seed, batch_size
  settings: dict              # what every output row records of the options
  max_length: int | None
  skipped: dict               # reason -> count
  written: set                # (prompt id key, sample) already in `out`
  complete_bytes: int         # the size of `out`'s complete lines


def prepare(workdir: str, prompts_path: str, out: str, *, num_samples: int = 1, max_new_tokens: int = 256,
            temperature: float = 0.7, top_p: float | None = 0.95, top_k: int | None = None, seed: int = 0,
            batch_size: int = 16, step: int | None = None, source: str | None = None,
            max_length: int | None = None) -> Job:
  """Checks the options, the run, the prompt file and --out, and loads the run: any bad input is a one-line
  ValueError or FileNotFoundError here, before anything is generated."""
  from data import chat, tokenizers
  check_options(num_samples, max_new_tokens, temperature, top_k, top_p, batch_size, max_length)
  config, module = loader.language_model(workdir)
  data = config.get('data') or {}
  template = data.get('template') or 'zephyr'
  tokenizer = tokenizers.get_tokenizer(data.tokenizer)
  prompts, repeated = read_prompts(prompts_path)
  max_length = max_length or data.get('seq_len') or data.get('max_length')
  fitting, too_long = [], 0
  for p in prompts:
    try:
      tokens, _ = chat.encode(p.messages, tokenizer, template, add_generation_prompt=True, where=p.where)
    except chat.ChatError as e:  # the template's own rules (the mistral one's alternating roles)
      raise ValueError(str(e) if str(e).startswith(p.where) else f'{p.where}: {e}') from None
    p.tokens = [int(t) for t in tokens]
    if max_length and len(p.tokens) >= max_length:
      too_long += 1
    else:
      fitting.append(p)
  run = loader.load_run(workdir, step)
  settings = dict(source=source or os.path.basename(os.path.normpath(workdir)), temperature=temperature,
                  top_p=top_p, top_k=top_k, seed=seed, step=run.step, max_new_tokens=max_new_tokens,
                  tokenizer=data.tokenizer)
  written, complete = read_written(out, settings)
  skipped = {f'of {max_length}+ tokens (--max_length)': too_long, 'repeating a prompt_id': repeated}
  options = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, batch_size=batch_size)
  return Job(run, module, tokenizer, fitting, out, options, settings, max_length, skipped, written, complete)


def _generate_batch(job: Job, batch: list[tuple[Prompt, int]]) -> tuple[list[dict], int]:
  """The output rows of `batch` (every row of it, so that a rerun computes exactly what the first run did),
  and the tokens generated."""
  o, tok = job.options, job.tokenizer
  size = o['batch_size']
  # Filler rows repeat the first one (same prompt, same key): shapes stay fixed, and they stop when it does.
  rows = batch + [batch[0]] * (size - len(batch))
  lengths = np.asarray([len(p.tokens) for p, _ in rows], np.int32)
  tokens = np.full((size, _width(int(lengths.max()))), tok.pad_id, np.int32)
  for i, (p, _) in enumerate(rows):
    tokens[i, :len(p.tokens)] = p.tokens
  greedy = o['temperature'] == 0
  out = job.module.generate(job.run.model, job.run.params, tokens, o['max_new_tokens'],
                            temperature=o['temperature'], rng=None if greedy else sample_keys(o['seed'], rows),
                            top_k=o['top_k'], top_p=o['top_p'], prompt_lengths=lengths, eos_id=tok.eos_id,
                            pad_id=tok.pad_id)
  out = np.asarray(out)
  result, generated = [], 0
  for i, (p, k) in enumerate(batch):
    n = len(p.tokens)
    budget = o['max_new_tokens'] if not job.max_length else min(o['max_new_tokens'], job.max_length - n)
    new = [int(t) for t in out[i, n:n + budget]]
    finished = tok.eos_id in new
    if finished:
      new = new[:new.index(tok.eos_id) + 1]
    generated += len(new)
    reply = tok.decode(new[:-1] if finished else new)
    user = next(m['content'] for m in reversed(p.messages) if m['role'] == 'user')
    s = job.settings
    result.append({'prompt_id': p.prompt_id, 'prompt': user,
                   'messages': p.messages + [{'role': 'assistant', 'content': reply}], 'sample': k,
                   'source': s['source'], 'temperature': s['temperature'], 'top_p': s['top_p'], 'top_k': s['top_k'],
                   'seed': s['seed'], 'step': s['step'], 'max_new_tokens': s['max_new_tokens'],
                   'tokenizer': s['tokenizer'], 'finished': finished, 'num_tokens': len(new)})
  return result, generated


def write(job: Job) -> str:
  """Generates the rows missing from job.out, appending them batch by batch; returns the summary line."""
  directory = os.path.dirname(os.path.abspath(job.out))
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(job.out) and os.path.getsize(job.out) > job.complete_bytes:
    with open(job.out, 'r+b') as f:
      f.truncate(job.complete_bytes)  # the partial last row of a killed run: generated again below
  batches = plan(job.prompts, job.options['num_samples'], job.options['batch_size'])
  total_rows = sum(len(b) for b in batches)
  new_rows = generated = 0
  start = last_log = time.time()
  for batch in batches:
    if all((p.id_key, k) in job.written for p, k in batch):
      continue
    rows, n = _generate_batch(job, batch)
    _append(job.out, [r for r, (p, k) in zip(rows, batch) if (p.id_key, k) not in job.written])
    new_rows += sum((p.id_key, k) not in job.written for p, k in batch)
    generated += n
    if time.time() - last_log > PROGRESS_EVERY_S:
      last_log = time.time()
      print(f'generate: {len(job.written) + new_rows}/{total_rows} rows, '
            f'{generated / (last_log - start):.0f} tokens/s', file=sys.stderr, flush=True)
  seconds = time.time() - start
  skipped = ', '.join(f'{n} {why}' for why, n in job.skipped.items() if n)
  return (f'generate: {len(job.prompts) + sum(job.skipped.values())} prompts'
          + (f' ({sum(job.skipped.values())} skipped: {skipped})' if skipped else '')
          + f'; {new_rows} rows written to {job.out} ({total_rows - new_rows} already there); '
          f'{generated} tokens in {seconds:.1f} s ({generated / max(seconds, 1e-9):.0f} tokens/s)')


def main(argv):
  cli.no_arguments(argv, 'the prompts go in a JSONL file named by --prompts')
  cli.quiet_logging()
  with cli.failing_on(FileNotFoundError, ValueError):
    job = prepare(FLAGS.workdir, FLAGS.prompts, FLAGS.out, num_samples=FLAGS.num_samples,
                  max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                  top_k=FLAGS.top_k, seed=FLAGS.seed, batch_size=FLAGS.batch_size, step=FLAGS.step,
                  source=FLAGS.source, max_length=FLAGS.max_length)
  print(write(job))


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
