"""A pipeline's prompts from an embedded chat set: the first user turn of each conversation of one split.

`write(path, dataset='chat/stdlib', split='train', count=N, offset=K, answers=False)` (split may be a sum,
'validation+test') writes JSONL rows
{"prompt_id", "messages"}: the conversation up to its first user message (its system message included), or, with
answers=True, up to the first assistant reply too (a held-out answer to score models on). Conversations are taken
in the order of a hash of their key, so that N of them mix the whole library rather than its first modules, and
rows offset..offset+count of that order are written: two stages with disjoint ranges get disjoint prompts.
"""
import functools
import hashlib
import json
import os

DATASETS = ('chat/stdlib',)


def _first_turn(messages: list[dict], answers: bool) -> list[dict]:
  users = [i for i, m in enumerate(messages) if m['role'] == 'user']
  end = users[0] + 1
  if answers:
    end += 1
    if end > len(messages) or messages[end - 1]['role'] != 'assistant':
      return []
  return messages[:end]


@functools.cache  # The pipeline's prompt stages read one set several times.
def _every(dataset: str) -> tuple[tuple[str, list[dict]], ...]:
  from data import chat_data
  return tuple(chat_data.stdlib_conversations())


def conversations(dataset: str, split: str) -> tuple[tuple[str, list[dict]], ...]:
  if dataset not in DATASETS:
    raise ValueError(f'prompts stage: dataset {dataset!r} is not embedded; choose one of {list(DATASETS)}, or give '
                     'a prompt file to the generate stage directly.')
  from data import chat_data
  wanted = set(split.split('+'))
  unknown = wanted - {'train', 'validation', 'test'}
  if unknown:
    raise ValueError(f'prompts stage: split {split!r} names {sorted(unknown)}; use train, validation, test or a '
                     'sum such as validation+test.')
  found = [(key, m) for key, m in _every(dataset) if chat_data.split_of(key) in wanted]
  return tuple(sorted(found, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest()))


def write(path: str, dataset: str, split: str, count: int, offset: int = 0, answers: bool = False) -> int:
  found = conversations(dataset, split)
  if offset + count > len(found):
    raise ValueError(f'prompts stage: {dataset} split {split!r} holds {len(found)} conversations, fewer than '
                     f'offset {offset} + count {count}; lower the count.')
  rows = []
  for key, messages in found[offset:offset + count]:
    turn = _first_turn(messages, answers)
    if turn:
      rows.append({'prompt_id': key, 'messages': turn})
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  os.replace(tmp, path)
  print(f'[prompts] {len(rows)} {"turns" if answers else "prompts"} of {dataset}:{split} '
        f'[{offset}:{offset + count}] -> {path}', flush=True)
  return len(rows)
