"""`preference`: pairs of answers to one prompt (chosen, rejected) as a TFDS dataset, from JSONL files, built offline.

Select with `tfds.builder('preference', config=files_config(glob, on_bad_line))`. Each line is one pair in either
shape preference sets use:
  UltraFeedback-binarized   {"prompt": str, "chosen": [messages], "rejected": [messages]}, each message list the
                            whole conversation (the prompt's turns, then the answer); their prompts must agree
  prompt and answers apart  {"prompt": [messages] or str, "chosen": [messages] or str, "rejected": ...}, the
                            answers being the assistant's turns only (TRL's conversational and standard shapes)
Messages are chat's `{"role", "content"}` (data/chat.py). A line missing a field, with bad messages, or whose
answers do not end with an assistant turn stops the build naming its file and line (on_bad_line='error', the
default) or is skipped with a warning ('skip'). A pair whose chosen answer equals its rejected one teaches
nothing: it is always skipped, and counted. The counts of read, kept and skipped lines are logged at the end.

Features (str, JSON): `prompt` (the prompt's messages, ending with a user turn), `chosen` and `rejected` (the
answers' assistant messages), and `source` ('file:line' relative to the glob's root). Splits by a hash of the
pair, as `chat` splits conversations (data/chat_data.py): validation 5%, test 5%, train the rest.
"""
from collections.abc import Mapping
import collections
import hashlib
import json
import logging
import os

from etils import epath
import tensorflow_datasets as tfds

from . import chat
from . import chat_data
from . import text


def _messages(value, field: str, where: str) -> list[dict[str, str]]:
  if isinstance(value, str):  # A bare string: a prompt is a user turn, an answer an assistant turn.
    return [{'role': 'user' if field == 'prompt' else 'assistant', 'content': value}]
  return chat.validate(value, f'{where}: "{field}"')


def parse_pair(line: str, where: str):
  """One JSONL line -> (prompt messages, chosen answer messages, rejected answer messages); ChatError otherwise."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise chat.ChatError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(record, Mapping):
    raise chat.ChatError(f'{where}: expected an object with "chosen" and "rejected"')
  missing = [f for f in ('chosen', 'rejected') if f not in record]
  if missing:
    raise chat.ChatError(f'{where}: the pair has no "{missing[0]}" field (a pair needs "chosen" and "rejected", '
                         'and "prompt" unless both hold the whole conversation)')
  chosen, rejected = (_messages(record[f], f, where) for f in ('chosen', 'rejected'))
  if len(chosen) > 1 or len(rejected) > 1:  # Whole conversations: the prompt is what precedes the last turn.
    prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if prompt != _messages(record['rejected'], 'rejected', where)[:-1]:
      raise chat.ChatError(f'{where}: "chosen" and "rejected" continue different conversations; a pair answers '
                           'one prompt')
  elif 'prompt' in record:
    prompt = _messages(record['prompt'], 'prompt', where)
  else:
    raise chat.ChatError(f'{where}: the pair has no "prompt" field and its answers hold no prompt turns')
  for name, answer in (('chosen', chosen), ('rejected', rejected)):
    if answer[-1]['role'] != 'assistant':
      raise chat.ChatError(f'{where}: "{name}" must end with an assistant turn, not {answer[-1]["role"]!r}')
  if not prompt or prompt[-1]['role'] != 'user':
    raise chat.ChatError(f'{where}: the prompt must end with a user turn')
  return prompt, chosen, rejected


def files_config(files: str, on_bad_line: str = 'error') -> chat_data.ChatConfig:
  """A config for the JSONL glob `files`, named as chat_data.files_config names it (the files' fingerprint)."""
  return chat_data.files_config(files, on_bad_line, what='Preference')


def jsonl_pairs(root: str, paths: list[str], on_bad_line: str, counts: collections.Counter):
  """(key, prompt, chosen, rejected, 'file:line') of every kept pair; `counts` gets read, kept and each skip."""
  for path in paths:
    rel = os.path.relpath(path, root)
    with open(path, encoding='utf-8', errors='replace') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        counts['read'] += 1
        where = f'{path}:{number}'
        try:
          prompt, chosen, rejected = parse_pair(line, where)
        except chat.ChatError as e:
          if on_bad_line == 'error':
            raise chat.ChatError(f"{e}; fix or remove the line, or set data.on_bad_line='skip'") from None
          logging.warning('skipped a line that is not a valid pair: %s', e)
          counts['skipped: not a valid pair'] += 1
          continue
        if chosen == rejected:
          logging.warning('skipped %s: its chosen answer equals its rejected one', where)
          counts['skipped: chosen equals rejected'] += 1
          continue
        counts['kept'] += 1
        yield json.dumps([prompt, chosen, rejected], sort_keys=True), prompt, chosen, rejected, f'{rel}:{number}'


class Preference(tfds.core.GeneratorBasedBuilder):
  """Preference pairs from JSONL files; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'prompt, chosen, rejected (JSON) + source; splits by sha256(pair) % 100.'}
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [chat_data.ChatConfig(name='none', description='Give files_config(glob) as the config.')]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=__doc__, features=tfds.features.FeaturesDict(
        {f: tfds.features.Text() for f in ('prompt', 'chosen', 'rejected', 'source')}))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    if config.files is None:
      raise ValueError('the preference dataset is made from files: set data.files to a glob of JSONL pairs.')
    root, paths = text.resolve(config.files)
    if not paths:
      raise FileNotFoundError(f'data.files={config.files!r} matches no file; point it at preference JSONL files.')
    splits, seen, counts = {'train': [], 'validation': [], 'test': []}, set(), collections.Counter()
    for key, *pair in jsonl_pairs(root, paths, config.on_bad_line, counts):
      if key in seen:
        counts['skipped: repeated'] += 1
        continue
      seen.add(key)
      splits[chat_data.split_of(key)].append((key, *pair))
    logging.warning('preference data %s: %s', config.files, ', '.join(f'{n} {k}' for k, n in counts.items()))
    # TFDS refuses an empty split; a split a few pairs leave empty is absent (reading it names it).
    return {name: self._generate_examples(items) for name, items in splits.items() if items}

  def _generate_examples(self, items):
    for key, prompt, chosen, rejected, source in items:
      yield hashlib.sha256(key.encode('utf-8')).hexdigest(), {
          'prompt': json.dumps(prompt), 'chosen': json.dumps(chosen), 'rejected': json.dumps(rejected),
          'source': source}
