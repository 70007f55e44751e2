"""Chat conversations: validation, templates, and token ids with per-token loss weights.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}` (the
shape of UltraChat-200k and most instruction sets). `encode(messages, tokenizer, template)` renders it with
a chat template and returns int32 `tokens` and `weights`: 1 on every token of an assistant reply and on
the EOS that ends it, 0 on the template's markup, on system and user turns and on the BOS. Supervised
finetuning trains on the weighted tokens only.

Templates (`TEMPLATES`; `template` in the data config):
  zephyr    Zephyr's (HuggingFaceH4/zephyr-7b-beta): every turn is `<|role|>` + newline + content + EOS +
            newline, e.g. `<|system|>\\nBe brief.</s>\\n<|user|>\\nHi</s>\\n<|assistant|>\\nHello!</s>\\n`; a
            generation prompt is `<|assistant|>\\n`. The markers are plain text, EOS is the tokenizer's id.
  mistral   Mistral-Instruct's: `[INST] user [/INST]assistant</s>[INST] user [/INST]...`; roles must
            alternate user, assistant, ...; a system message (first only) is put before the first user
            message with a blank line, as Mistral's later templates do. A generation prompt is the
            conversation ending in a user turn.
Both start with the tokenizer's BOS (the Zephyr recipe tokenizes its rendered text with special tokens on).

Tokenization: the rendered text is cut at every EOS; each piece is encoded whole (so a SentencePiece
model sees the same text as it would in the rendered string) and a token is weighted 1 if any of its bytes
lies in an assistant reply. `render(messages, template)` gives the string with '</s>' for EOS, for display.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import json

import numpy as np

ROLES = ('system', 'user', 'assistant')
EOS_TEXT = '</s>'


class ChatError(ValueError):
  """A conversation that is not valid chat; the message says where and what."""


def validate(messages, where: str = 'conversation') -> list[dict[str, str]]:
  """The messages as plain {'role', 'content'} dicts, or a ChatError naming `where` and the problem."""
  if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
    raise ChatError(f'{where}: "messages" must be a list of {{"role", "content"}} objects, got '
                    f'{type(messages).__name__}')
  if not messages:
    raise ChatError(f'{where}: the conversation is empty (no messages)')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ChatError(f'{where}: message {i} is a {type(m).__name__}, not a {{"role", "content"}} object')
    if 'role' not in m:
      raise ChatError(f'{where}: message {i} has no "role" (one of {", ".join(ROLES)})')
    if m['role'] not in ROLES:
      raise ChatError(f'{where}: message {i} has the unknown role {m["role"]!r}; use one of {", ".join(ROLES)}')
    if not isinstance(m.get('content'), str):
      raise ChatError(f'{where}: message {i} ({m["role"]}) has no "content" string')
    out.append({'role': m['role'], 'content': m['content']})
  if not any(m['role'] == 'assistant' for m in out) and not any(m['role'] == 'user' for m in out):
    raise ChatError(f'{where}: the conversation has neither a user nor an assistant message')
  return out


def parse_line(line: str, where: str) -> list[dict[str, str]]:
  """One JSONL line `{"messages": [...]}` -> validated messages (ChatError naming `where` otherwise)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ChatError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(record, Mapping) or 'messages' not in record:
    raise ChatError(f'{where}: expected an object with a "messages" list')
  return validate(record['messages'], where)


@dataclasses.dataclass(frozen=True)
class Piece:
  """Rendered text; `trained` marks an assistant reply; `eos` ends the piece with the EOS token."""
  text: str
  trained: bool = False
  eos: bool = False


class Zephyr:
  name = 'zephyr'

  def pieces(self, messages, add_generation_prompt: bool = False) -> list[Piece]:
    out = []
    for m in messages:
      out.append(Piece(f'<|{m["role"]}|>\n'))
      out.append(Piece(m['content'], trained=m['role'] == 'assistant', eos=True))
      out.append(Piece('\n'))
    if add_generation_prompt:
      out.append(Piece('<|assistant|>\n'))
    return out


class MistralInstruct:
  name = 'mistral'

  def pieces(self, messages, add_generation_prompt: bool = False) -> list[Piece]:
    system = None
    if messages and messages[0]['role'] == 'system':
      system, messages = messages[0]['content'], messages[1:]
    out = []
    for i, m in enumerate(messages):
      expected = 'user' if i % 2 == 0 else 'assistant'
      if m['role'] != expected:
        raise ChatError(f"the 'mistral' template needs roles alternating user, assistant, ... (after an "
                        f"optional first system message); message {i + (system is not None)} is {m['role']!r}")
      if m['role'] == 'user':
        content = m['content'] if system is None or i else f'{system}\n\n{m["content"]}'
        out.append(Piece(f'[INST] {content} [/INST]'))
      else:
        out.append(Piece(m['content'], trained=True, eos=True))
    if add_generation_prompt and (not messages or messages[-1]['role'] != 'user'):
      raise ChatError("the 'mistral' template prompts for a reply after a user message; the conversation "
                      'ends with another role')
    return out


TEMPLATES = {t.name: t for t in (Zephyr(), MistralInstruct())}


def get_template(name: str):
  if name not in TEMPLATES:
    raise ValueError(f'chat template {name!r} does not exist; use one of {", ".join(sorted(TEMPLATES))}.')
  return TEMPLATES[name]


def render(messages, template: str, add_generation_prompt: bool = False) -> str:
  """The conversation as text, EOS written as '</s>' (BOS not shown)."""
  pieces = get_template(template).pieces(validate(messages), add_generation_prompt)
  return ''.join(p.text + (EOS_TEXT if p.eos else '') for p in pieces)


def encode(messages, tokenizer, template: str, add_generation_prompt: bool = False,
           where: str = 'conversation') -> tuple[np.ndarray, np.ndarray]:
  """(tokens, weights), int32 [n] each: BOS, the rendered conversation, weights 1 on assistant replies and
  their EOS. With add_generation_prompt the tokens end where the model's reply begins."""
  pieces = get_template(template).pieces(validate(messages, where), add_generation_prompt)
  tokens, weights = [tokenizer.bos_id], [0]
  run: list[Piece] = []

  def flush(eos_weight=None):
    text = ''.join(p.text for p in run)
    spans, at = [], 0
    for p in run:
      n = len(p.text.encode('utf-8'))
      if p.trained:
        spans.append((at, at + n))
      at += n
    ids, offsets = tokenizer.encode_with_offsets(text) if text else ([], [])
    tokens.extend(ids)
    weights.extend(int(any(s < e2 and s2 < e for s2, e2 in spans)) for s, e in offsets)
    if eos_weight is not None:
      tokens.append(tokenizer.eos_id)
      weights.append(eos_weight)
    run.clear()

  for p in pieces:
    run.append(p)
    if p.eos:
      flush(eos_weight=int(p.trained))
  flush()
  return np.asarray(tokens, np.int32), np.asarray(weights, np.int32)
