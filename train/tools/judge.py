r"""Scores candidate answers with a judge model and binarizes them into preference pairs (Zephyr's AI feedback).

  python -m train.judge --workdir=workdirs/judge --candidates='gen/a.jsonl,gen/b*.jsonl' --out=pairs.jsonl
  python -m train.judge --workdir=workdirs/judge --candidates=gen/*.jsonl --out=pairs.jsonl --method=rating

Candidates are chat JSONL rows as `python -m train.generate` writes them: `{"prompt_id", "messages": [...,
{"role": "assistant", "content": answer}], "source", "sample", "tokenizer"}`; the answer is the last
assistant message, the prompt the messages before it (ending with a user turn). Rows are grouped by prompt_id
(when absent: a hash of the prompt's messages); a group's rows must share their prompt.

Methods (the judge is a language-model run or an imported model; its chat template is its data.template,
zephyr when it has none, its tokenizer data.tokenizer):
  loglik   (default, "mean_token_loglik") the mean over the answer's tokens (its reply tokens and the EOS
           that ends it, in the judge's template) of log p_judge(token | everything before it). A longer
           conversation than --max_length (default: the judge's data.seq_len) loses the start of its prompt;
           an answer that alone does not fit is not scored, and counted.
  rating   the judge is asked, in its template, to rate the answer to the question from 1 to 9; the score is
           the expected digit under its next-token distribution restricted to the tokens '1'..'9'. How a real
           instruction-following judge is used; a CPU-sized model has no such ability, loglik is its signal.

Binarization, Zephyr's rule (Tunstall et al. 2023, section 4.1): per prompt, chosen = the best-scored answer
(ties: the first by (source, sample)), rejected = one of the others drawn at random, with a generator seeded by
(--seed, prompt_id) only, so the draw does not depend on the order of the files. An answer whose text equals
the chosen one's is never rejected; a prompt with fewer than two distinct answers gives no pair.

Writes --out, one pair per prompt in UltraFeedback-binarized's shape (data/preference_data.py reads it):
`{"prompt_id", "prompt", "chosen": [messages], "rejected": [messages], "score_chosen", "score_rejected",
"source_chosen", "source_rejected", "method", "judge"}`, and --scores (default: OUT.scores.jsonl), one row per
candidate `{"prompt_id", "source", "sample", "score", "num_tokens", "method", "judge"}` (score null for an
answer too long to score; num_tokens: the answer's tokens for loglik, the rating prompt's for rating). Both
are written whole or not at all. One summary line is printed.

The judge must read the tokenizer that the policy wrote the candidates with (their "tokenizer"): a per-token
score is normalised per token of the judge's own vocabulary, and the DPO stage tokenizes the pairs with the
policy's.
"""
from collections.abc import Mapping, Sequence
import collections
import dataclasses
import functools
import glob
import hashlib
import json
import os
import sys
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from train import cli
from train.tools import loader

FLAGS = flags.FLAGS
METHODS = {'loglik': 'mean_token_loglik', 'rating': 'rating'}  # flag value -> the name written in the outputs
BUCKET = 64  # Padded lengths are multiples of this: one compile per bucket, not per length.
DIGITS = '123456789'
RATING_PROMPT = ('Rate the following answer to the question from 1 to 9 (1: wrong or unhelpful, 9: correct, '
                 'helpful and honest). Reply with the digit only.\n\nQuestion:\n{question}\n\nAnswer:\n{answer}')


def define_flags() -> None:
  """The command line flags (defined only when run as a command)."""
  flags.DEFINE_string('workdir', None, 'The judge: a language model\'s training workdir or imported model.')
  flags.DEFINE_string('candidates', None, 'Comma-separated globs of candidate chat JSONL files '
                      '(python -m train.generate\'s output).')
  flags.DEFINE_string('out', None, 'The preference pairs (JSONL) to write.')
  flags.DEFINE_string('scores', None, 'Every candidate\'s score (JSONL); default: --out with .scores.jsonl.')
  flags.DEFINE_enum('method', 'loglik', list(METHODS), 'loglik: the answer\'s mean token log-likelihood; '
                    'rating: the expected 1-9 rating the judge gives when asked.')
  flags.DEFINE_integer('seed', 0, 'Seeds the draw of each prompt\'s rejected answer (with its prompt_id).')
  flags.DEFINE_integer('batch_size', 16, 'Sequences per forward pass.')
  flags.DEFINE_integer('step', None, 'The judge\'s checkpoint step (default: the latest).')
  flags.DEFINE_integer('max_length', None, 'Tokens per sequence (default: the judge\'s data.seq_len or '
                       'data.max_length; unlimited when it has neither).')
  for name in ('workdir', 'candidates', 'out'):
    flags.mark_flag_as_required(name)


def check_options(method: str, batch_size: int, seed: int, max_length: int | None) -> None:
  """ValueError, one line, for options out of range."""
  if method not in METHODS:
    raise ValueError(f'--method={method!r}: use one of {", ".join(METHODS)}.')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size} must be at least 1.')
  if seed < 0:
    raise ValueError(f'--seed={seed} must be >= 0.')
  if max_length is not None and max_length < 2:
    raise ValueError(f'--max_length={max_length} must be at least 2 (a prompt token and an answer token).')


# Candidates.

@dataclasses.dataclass
class Candidate:
  prompt_id: Any              # str or int
  prompt: list[dict[str, str]]
  answer: str
  source: str
  sample: int
  where: str                  # FILE:LINE
  tokenizer: str | None = None
  score: float | None = None
  num_tokens: int | None = None


def _prompt_hash(prompt) -> str:
  return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode('utf-8')).hexdigest()[:16]


def parse_candidate(line: str, path: str, number: int) -> Candidate:
  """One JSONL line of `path` -> a Candidate; ValueError starting 'PATH:LINE:' otherwise."""
  from data import chat
  where = f'{path}:{number}'
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line.') from None
  if not isinstance(record, Mapping) or 'messages' not in record:
    raise ValueError(f'{where}: expected an object with a "messages" list ending with the assistant\'s answer.')
  messages = chat.validate(record['messages'], where)
  if messages[-1]['role'] != 'assistant':
    raise ValueError(f'{where}: the last message is the {messages[-1]["role"]}\'s; a candidate ends with the '
                     'assistant\'s answer.')
  prompt = messages[:-1]
  if not prompt or prompt[-1]['role'] != 'user':
    raise ValueError(f'{where}: the answer must follow a user message (the prompt ends with a user turn).')
  prompt_id = record.get('prompt_id')
  if prompt_id is None:
    prompt_id = _prompt_hash(prompt)
  source, sample = record.get('source', path), record.get('sample', number)
  if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool):
    raise ValueError(f'{where}: "prompt_id" must be a string or an integer, got {prompt_id!r}.')
  if not isinstance(source, str) or not isinstance(sample, int) or isinstance(sample, bool):
    raise ValueError(f'{where}: "source" must be a string and "sample" an integer, got {source!r} and {sample!r}.')
  tokenizer = record.get('tokenizer')
  return Candidate(prompt_id, prompt, messages[-1]['content'], source, sample, where,
                   None if tokenizer is None else str(tokenizer))


def candidate_files(patterns: str) -> list[str]:
  """The files matched by comma-separated globs, each once, in the order given (each glob's sorted)."""
  files, seen = [], set()
  for pattern in filter(None, (p.strip() for p in patterns.split(','))):
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise FileNotFoundError(f'--candidates: {pattern!r} matches no file; point it at generated JSONL files.')
    for path in matched:
      if os.path.realpath(path) not in seen:
        seen.add(os.path.realpath(path))
        files.append(path)
  if not files:
    raise ValueError('--candidates is empty; give comma-separated globs of candidate JSONL files.')
  return files


def read_candidates(patterns: str) -> list[Candidate]:
  out = []
  for path in candidate_files(patterns):
    with open(path, encoding='utf-8', errors='replace') as f:
      out.extend(parse_candidate(line, path, n) for n, line in enumerate(f, 1) if line.strip())
  return out


def _id_key(prompt_id):
  return (isinstance(prompt_id, str), prompt_id)  # Integers first, numerically; then strings.


def group(candidates: Sequence[Candidate]) -> dict[Any, list[Candidate]]:
  """prompt_id -> its candidates sorted by (source, sample), prompt_ids sorted; ValueError naming both lines for
  candidates of one prompt_id with different prompts, or one (prompt_id, source, sample) twice."""
  groups = collections.defaultdict(list)
  for c in candidates:
    groups[c.prompt_id].append(c)
  out = {}
  for prompt_id in sorted(groups, key=_id_key):
    members = sorted(groups[prompt_id], key=lambda c: (c.source, c.sample, c.where))
    for a, b in zip(members, members[1:]):
      if (a.source, a.sample) == (b.source, b.sample):
        raise ValueError(f'{a.where} and {b.where}: the same candidate (prompt_id {prompt_id!r}, source '
                         f'{a.source!r}, sample {a.sample}) twice; give each file once.')
    first = members[0]
    for c in members[1:]:
      if c.prompt != first.prompt:
        raise ValueError(f'{first.where} and {c.where}: prompt_id {prompt_id!r} with different prompt messages; '
                         'candidates of one prompt must answer the same conversation.')
    out[prompt_id] = members
  return out


# The judge.

@dataclasses.dataclass
class Judge:
  name: str                   # what --workdir said, written into the outputs
  run: Any                    # loader.Run
  tokenizer: Any
  template: str
  max_length: int | None


def _same_tokenizer(a: str, b: str) -> bool:
  """Equal specs, or two paths to the same SentencePiece model file."""
  if a == b:
    return True
  if not (a.endswith('.model') and b.endswith('.model')):
    return False
  return _file_digest(a) is not None and _file_digest(a) == _file_digest(b)


@functools.lru_cache(maxsize=None)
def _file_digest(spec: str) -> str | None:
  from etils import epath
  try:
    return hashlib.sha256(epath.Path(os.path.expanduser(spec)).read_bytes()).hexdigest()
  except (OSError, ValueError):
    return None


def check_tokenizers(name: str, judge_tokenizer: str, candidates: Sequence[Candidate]) -> None:
  """ValueError, one line, when a candidate was generated with another tokenizer than the judge's."""
  for c in candidates:
    if c.tokenizer is not None and not _same_tokenizer(c.tokenizer, judge_tokenizer):
      raise ValueError(
          f'the judge {name} reads tokenizer {judge_tokenizer}, but {c.where} was generated by a policy with '
          f'tokenizer {c.tokenizer}; use a judge that shares the policy\'s tokenizer (a per-token log-likelihood '
          'judge normalises its scores per token of its own vocabulary, and the DPO stage re-tokenizes the pairs '
          'with the policy\'s).')


def load_judge(workdir: str, step: int | None = None, max_length: int | None = None,
               candidates: Sequence[Candidate] = (), method: str = 'loglik') -> Judge:
  """The judge in `workdir`, after checking it is a language model with the candidates' tokenizer (and, for
  `method` 'rating', one token per digit)."""
  from data import chat, tokenizers
  config, _ = loader.language_model(workdir)
  data = config.data
  check_tokenizers(workdir, data.tokenizer, candidates)
  template = data.get('template') or 'zephyr'
  chat.get_template(template)
  tokenizer = tokenizers.get_tokenizer(data.tokenizer)
  if method == 'rating':
    rating_digits(tokenizer, template)
  max_length = max_length or data.get('seq_len') or data.get('max_length')
  return Judge(workdir, loader.load_run(workdir, step), tokenizer, template, max_length)


# Rows: token sequences the judge reads, right-padded into batches.

def _last_run(weights: np.ndarray) -> tuple[int, int]:
  """[start, end) of the last run of weight-1 tokens: the final assistant message and its EOS (a prompt's
  earlier assistant turns are weighted too)."""
  end = int(np.flatnonzero(weights)[-1]) + 1
  start = end - 1
  while start > 0 and weights[start - 1]:
    start -= 1
  return start, end


def _encode(messages, tokenizer, template, where):
  from data import chat
  try:
    return chat.encode(messages, tokenizer, template)
  except chat.ChatError as e:
    raise ValueError(f'{where}: {e}') from None


def answer_row(prompt, answer, tokenizer, template, max_length=None, where='candidate'):
  """(tokens up to the answer's EOS, the answer's first index, the answer's token count); tokens None when the
  answer alone does not fit in max_length (it needs one token before it). A longer prompt loses its start."""
  tokens, weights = _encode(list(prompt) + [{'role': 'assistant', 'content': answer}], tokenizer, template, where)
  start, end = _last_run(weights)
  tokens, n = tokens[:end], end - start
  if max_length and len(tokens) > max_length:
    if n > max_length - 1:
      return None, None, n
    start -= len(tokens) - max_length
    tokens = tokens[-max_length:]
  return tokens, start, n


def _question(prompt) -> str:
  turns = [m for m in prompt if m['role'] != 'system']
  if len(turns) == 1:
    return turns[0]['content']
  return '\n'.join(f'{m["role"]}: {m["content"]}' for m in turns)


def _rating_request(prompt, answer) -> list[dict[str, str]]:
  return [{'role': 'user', 'content': RATING_PROMPT.format(question=_question(prompt), answer=answer)}]


def rating_digits(tokenizer, template) -> list[int]:
  """The token ids of the replies '1'..'9' as the judge's template writes them; ValueError if one is not a
  single token."""
  digits = []
  for d in DIGITS:
    tokens, weights = _encode(_rating_request([{'role': 'user', 'content': 'q'}], 'a') +
                              [{'role': 'assistant', 'content': d}], tokenizer, template, 'the rating prompt')
    start, end = _last_run(weights)
    if end - start != 2 or tokenizer.decode([int(tokens[start])]).strip() != d:
      raise ValueError(f'the judge\'s tokenizer does not write the rating {d} as one token in its chat template; '
                       '--method=rating needs one; use --method=loglik.')
    digits.append(int(tokens[start]))
  return digits


def rating_row(prompt, answer, tokenizer, template, max_length=None, where='candidate'):
  """The rating request's tokens, ending where the judge's reply (a digit) begins; a longer one loses its start."""
  # Encoded with a reply and cut before it: the context exactly as the reply's tokens follow it.
  tokens, weights = _encode(_rating_request(prompt, answer) + [{'role': 'assistant', 'content': DIGITS[0]}],
                            tokenizer, template, where)
  context = tokens[:_last_run(weights)[0]]
  return context[-max_length:] if max_length and len(context) > max_length else context


def _padded_length(n: int, max_length: int | None) -> int:
  bucket = -(-n // BUCKET) * BUCKET
  return max(n, min(bucket, max_length)) if max_length else bucket


def _forward(model, params, tokens, lengths):
  idx = jnp.arange(tokens.shape[1])
  real = idx[None] < lengths[:, None]
  return model.apply({'params': params}, tokens, segment_ids=real.astype(jnp.int32),
                     positions=jnp.where(real, idx[None], 0))


def _loglik_sums(model, params, tokens, lengths, starts):
  """Per row: the sum of log p(token) over the targets in [start, length)."""
  logits = _forward(model, params, tokens, lengths)[:, :-1]
  # Gathered logit minus logsumexp: no second [b, t, vocab] array for a full log_softmax.
  picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  target = jnp.arange(1, tokens.shape[1])[None]
  scored = (target >= starts[:, None]) & (target < lengths[:, None])
  return jnp.sum(jnp.where(scored, logp, 0.0), axis=1)


def _digit_logprobs(model, params, tokens, lengths, digits):
  """Per row: log p(digit) over the digits alone, after the row's last token."""
  logits = _forward(model, params, tokens, lengths)
  last = jnp.take_along_axis(logits, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return jax.nn.log_softmax(last[:, digits], axis=-1)


def _batched(run, rows, fn, extra, batch_size, max_length):
  """fn(params, tokens, lengths, extra[rows]) over `rows` (token arrays) right-padded in batches of one padded
  length each, shortest first; batches are filled with empty rows so that each length compiles once."""
  jitted = jax.jit(functools.partial(fn, run.model))
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  out = [None] * len(rows)
  at = 0
  while at < len(order):
    length = _padded_length(len(rows[order[at]]), max_length)
    chunk = [i for i in order[at:at + batch_size] if len(rows[i]) <= length]
    at += len(chunk)
    tokens = np.zeros((batch_size, length), np.int32)
    lengths = np.zeros(batch_size, np.int32)
    for b, i in enumerate(chunk):
      tokens[b, :len(rows[i])], lengths[b] = rows[i], len(rows[i])
    values = np.asarray(jitted(run.params, tokens, lengths, extra(chunk, batch_size)))
    for b, i in enumerate(chunk):
      out[i] = values[b]
  return out


def score(run, tokenizer, template: str, prompts_and_answers, method: str = 'loglik', batch_size: int = 16,
          max_length: int | None = None) -> list[tuple[float | None, int]]:
  """(score, num_tokens) of each (prompt messages, answer[, where]) by the judge `run` (see the module
  docstring); score None for an answer that does not fit in max_length."""
  items = [(p, a, rest[0] if rest else f'candidate {i}') for i, (p, a, *rest) in enumerate(prompts_and_answers)]
  if method == 'loglik':
    encoded = [answer_row(p, a, tokenizer, template, max_length, w) for p, a, w in items]
    kept = [i for i, (tokens, _, _) in enumerate(encoded) if tokens is not None]
    starts = np.asarray([encoded[i][1] for i in kept], np.int32)

    def extra(chunk, size):
      return np.pad(starts[chunk], (0, size - len(chunk)))

    sums = _batched(run, [encoded[i][0] for i in kept], _loglik_sums, extra, batch_size, max_length)
    out = [(None, n) for _, _, n in encoded]
    for i, total in zip(kept, sums):
      out[i] = (float(total) / encoded[i][2], encoded[i][2])
    return out
  if method == 'rating':
    digits = np.asarray(rating_digits(tokenizer, template), np.int32)
    rows = [rating_row(p, a, tokenizer, template, max_length, w) for p, a, w in items]
    logps = _batched(run, rows, _digit_logprobs, lambda chunk, size: digits, batch_size, max_length)
    values = np.arange(1, 10, dtype=np.float64)
    return [(float(np.exp(lp.astype(np.float64)) @ values), len(tokens)) for lp, tokens in zip(logps, rows)]
  raise ValueError(f'method={method!r}: use one of {", ".join(METHODS)}.')


# Binarization.

def _id_seed(prompt_id) -> int:
  return int.from_bytes(hashlib.sha256(json.dumps(prompt_id).encode('utf-8')).digest()[:8], 'big')


def _user_text(prompt) -> str:
  return next(m['content'] for m in reversed(prompt) if m['role'] == 'user')


def binarize(groups: Mapping[Any, Sequence[Candidate]], seed: int = 0) -> tuple[list[dict], collections.Counter]:
  """Zephyr's rule over scored candidates per prompt_id (see the module docstring): (pairs, skipped prompts by
  reason: 'single candidate', 'identical answers')."""
  pairs, skipped = [], collections.Counter()
  for prompt_id in sorted(groups, key=_id_key):
    members = sorted(groups[prompt_id], key=lambda c: (c.source, c.sample))
    if len(members) < 2:
      skipped['single candidate'] += 1
      continue
    chosen = members[0]
    for c in members[1:]:
      if c.score > chosen.score:  # Strictly better: a tie keeps the first in (source, sample) order.
        chosen = c
    eligible = [c for c in members if c.answer != chosen.answer]
    if not eligible:
      skipped['identical answers'] += 1
      continue
    # Seeded by (seed, prompt_id) alone: the same draw whatever the files' order or the other prompts.
    rejected = eligible[int(np.random.default_rng([seed, _id_seed(prompt_id)]).integers(len(eligible)))]
    pairs.append({
        'prompt_id': prompt_id, 'prompt': _user_text(chosen.prompt),
        'chosen': chosen.prompt + [{'role': 'assistant', 'content': chosen.answer}],
        'rejected': chosen.prompt + [{'role': 'assistant', 'content': rejected.answer}],
        'score_chosen': chosen.score, 'score_rejected': rejected.score,
        'source_chosen': chosen.source, 'source_rejected': rejected.source})
  return pairs, skipped


# Output.

def scores_path(out: str) -> str:
  return (out[:-len('.jsonl')] if out.endswith('.jsonl') else out) + '.scores.jsonl'


def write_jsonl(path: str, rows) -> None:
  """All of `rows` or nothing: a temporary file beside `path`, renamed onto it when complete."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def judge_and_write(loaded: Judge, groups: Mapping[Any, Sequence[Candidate]], out: str, scores: str | None = None,
                    method: str = 'loglik', seed: int = 0, batch_size: int = 16) -> str:
  """Scores every candidate, binarizes, writes --out and --scores; returns the summary line."""
  scores = scores or scores_path(out)
  if os.path.abspath(scores) == os.path.abspath(out):
    raise ValueError(f'--scores and --out are both {out}; give them different paths.')
  name = METHODS[method]
  flat = [c for members in groups.values() for c in members]
  results = score(loaded.run, loaded.tokenizer, loaded.template, [(c.prompt, c.answer, c.where) for c in flat],
                  method, batch_size, loaded.max_length)
  for c, (value, n) in zip(flat, results):
    c.score, c.num_tokens = value, n
  scored = {p: [c for c in members if c.score is not None] for p, members in groups.items()}
  unfit = collections.Counter({'no answer fits': sum(1 for m in scored.values() if not m)})
  pairs, skipped = binarize({p: m for p, m in scored.items() if m}, seed)
  skipped += unfit
  write_jsonl(scores, ({'prompt_id': c.prompt_id, 'source': c.source, 'sample': c.sample, 'score': c.score,
                        'num_tokens': c.num_tokens, 'method': name, 'judge': loaded.name} for c in flat))
  write_jsonl(out, ({**p, 'method': name, 'judge': loaded.name} for p in pairs))
  too_long = sum(c.score is None for c in flat)
  reasons = ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()) if n) or 'none'
  return (f'{len(groups)} prompts, {len(pairs)} pairs, skipped prompts: {reasons}; '
          + (f'{too_long} answers longer than the judge\'s {loaded.max_length} tokens unscored; ' if too_long else '')
          + f'method {name} (judge {loaded.name}); wrote {out} and {scores}')


def judge(workdir: str, candidates: str, out: str, scores: str | None = None, method: str = 'loglik',
          seed: int = 0, batch_size: int = 16, step: int | None = None, max_length: int | None = None) -> str:
  """The command as a function: returns its summary line."""
  check_options(method, batch_size, seed, max_length)
  groups = group(read_candidates(candidates))
  loaded = load_judge(workdir, step, max_length, [c for m in groups.values() for c in m], method)
  return judge_and_write(loaded, groups, out, scores, method, seed, batch_size)


def main(argv):
  cli.no_arguments(argv, 'candidate files go in --candidates=GLOB[,GLOB...]')
  cli.quiet_logging()
  with cli.failing_on(FileNotFoundError, ValueError):
    check_options(FLAGS.method, FLAGS.batch_size, FLAGS.seed, FLAGS.max_length)
    groups = group(read_candidates(FLAGS.candidates))
    loaded = load_judge(FLAGS.workdir, FLAGS.step, FLAGS.max_length, [c for m in groups.values() for c in m],
                        FLAGS.method)
  print(judge_and_write(loaded, groups, FLAGS.out, FLAGS.scores, FLAGS.method, FLAGS.seed, FLAGS.batch_size))


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
