"""`chat`: conversations as a TFDS dataset, built offline, from chat JSONL files or from the standard library.

Builder configs (select with `tfds.builder('chat/<config>')`):
  stdlib         (default) an instruction set made from the running Python's standard library, the same
                 real text on every machine (see `stdlib_conversations`): for each public top-level function
                 (or method of a top-level class) with a docstring, either one turn, "Write a Python function
                 `name(args)`: <its docstring's first paragraph>" -> its source, or four, with a system
                 message: "What does `module.name` do?" -> its docstring, "Write `name(args)`." -> its
                 source. 1,808 conversations on CPython 3.11.7, built in
                 about 3 seconds; median 568 byte tokens in the Zephyr template.
  custom_<hash>  made by `files_config(glob, on_bad_line)`: every line of the JSONL files the glob matches
                 (a directory: every file below it) is `{"messages": [{"role": ..., "content": ...}, ...]}`,
                 the shape of UltraChat-200k. A line that is not valid chat (bad JSON, no messages, a message
                 without a role or content, an unknown role, an empty conversation) stops the build with its
                 file and line number (on_bad_line='error', the default) or is skipped with a warning naming
                 them ('skip').

Features: `messages` (str: the conversation as JSON, roles and contents only) and `source` (str: 'file:line'
relative to the glob's root, or 'module.function').

Splits, by a hash of each conversation's `key` (the messages' JSON, or the function's name, so one
function's forms never straddle splits; adding data never moves another example):
  validation  int(sha256(key)[:8], 16) % 100 < 5;  test  5 <= ... < 10;  train  the rest.
Importing this module registers the builder under the name 'chat'.
"""
import ast
import dataclasses
import hashlib
import json
import logging
import os
import re
import textwrap

from etils import epath
import tensorflow_datasets as tfds

from . import chat
from . import text

VALIDATION_PERCENT, TEST_PERCENT = 5, 5
MAX_SOURCE_CHARS = 1200  # Longer functions are left out: they would not fit the CPU models' rows.
SYSTEM = 'You are a helpful assistant who knows the Python standard library.'


def split_of(key: str) -> str:
  bucket = int(hashlib.sha256(key.encode('utf-8')).hexdigest()[:8], 16) % 100
  if bucket < VALIDATION_PERCENT:
    return 'validation'
  return 'test' if bucket < VALIDATION_PERCENT + TEST_PERCENT else 'train'


# Lines as the ast module splits them: \r\n, \r or \n end a line (a form feed does not).
_LINE = re.compile(r'[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z')


def source_segment(lines: list[str], node: ast.AST) -> str:
  """`ast.get_source_segment(source, node)` from the source's lines split once (`_LINE`): the stdlib's function
  splits the whole file on every call, which made building the instruction set take a minute."""
  first, last = node.lineno - 1, node.end_lineno - 1
  if first == last:
    return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
  return ''.join([lines[first].encode()[node.col_offset:].decode(), *lines[first + 1:last],
                  lines[last].encode()[:node.end_col_offset].decode()])


def _functions(tree: ast.Module):
  """(qualified name, node) of public top-level functions and methods of top-level classes."""
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node.name, node
    elif isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
      for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
          yield f'{node.name}.{item.name}', item


def stdlib_conversations():
  """(key, messages) for the stdlib instruction set, in a fixed order (see the module docstring); a function
  defined twice in its module (under an if/else) is kept once, the first."""
  seen = set()
  for path in text.stdlib_files():
    module = os.path.basename(path)[:-len('.py')]
    with open(path, encoding='utf-8', errors='replace') as f:
      source = f.read()
    try:
      tree = ast.parse(source)
    except SyntaxError:
      continue
    lines = _LINE.findall(source)
    for qualname, node in _functions(tree):
      name = qualname.rsplit('.', 1)[-1]
      doc = (ast.get_docstring(node) or '').strip()
      if name.startswith('_') or not doc or len(doc) < 20:
        continue
      code = source_segment(lines, node)
      if not code or len(code) > MAX_SOURCE_CHARS:
        continue
      code = textwrap.dedent(' ' * node.col_offset + code)
      summary = ' '.join(doc.split('\n\n')[0].split())
      signature = f'{name}({ast.unparse(node.args)})'
      key = f'{module}.{qualname}'
      if key in seen:
        continue
      seen.add(key)
      if int(hashlib.sha256(key.encode()).hexdigest()[8:16], 16) % 2:
        messages = [{'role': 'user', 'content': f'Write a Python function `{signature}`: {summary}'},
                    {'role': 'assistant', 'content': code}]
      else:
        messages = [{'role': 'system', 'content': SYSTEM},
                    {'role': 'user', 'content': f'What does `{key}` do?'},
                    {'role': 'assistant', 'content': doc},
                    {'role': 'user', 'content': f'Write `{signature}`.'},
                    {'role': 'assistant', 'content': code}]
      yield key, messages


def jsonl_conversations(root: str, paths: list[str], on_bad_line: str):
  """(key, messages, 'file:line') of every valid line; bad lines per `on_bad_line` ('error' or 'skip')."""
  for path in paths:
    rel = os.path.relpath(path, root)
    with open(path, encoding='utf-8', errors='replace') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f'{path}:{number}'
        try:
          messages = chat.parse_line(line, where)
        except chat.ChatError as e:
          if on_bad_line == 'error':
            raise chat.ChatError(f"{e}; fix or remove the line, or set data.on_bad_line='skip'") from None
          logging.warning('skipped a line that is not valid chat: %s', e)
          continue
        yield json.dumps(messages, sort_keys=True), messages, f'{rel}:{number}'


@dataclasses.dataclass(eq=False)
class ChatConfig(tfds.core.BuilderConfig):
  """`files`: a glob or directory of JSONL files; None: the stdlib instruction set."""
  files: str | None = None
  on_bad_line: str = 'error'


def files_config(files: str, on_bad_line: str = 'error', what: str = 'Chat') -> ChatConfig:
  """A config for the JSONL glob `files` (of `what`: also preference pairs, data/preference_data.py), named
  `custom_<hash of the files' fingerprint (text.fingerprint: paths, sizes, times) and on_bad_line>`."""
  if on_bad_line not in ('error', 'skip'):
    raise ValueError(f"data.on_bad_line={on_bad_line!r} is unknown; use 'error' or 'skip'.")
  files = os.path.expanduser(files)
  digest = hashlib.sha256(f'{text.fingerprint(files)}|{on_bad_line}'.encode('utf-8')).hexdigest()[:10]
  return ChatConfig(name=f'custom_{digest}', files=files, on_bad_line=on_bad_line,
                    description=f'{what} JSONL files matching {files!r}.')


class Chat(tfds.core.GeneratorBasedBuilder):
  """Conversations (chat JSONL files, or the stdlib instruction set); see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'messages (JSON) + source; splits by sha256(key) % 100: <5 validation, <10 test.'}
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [ChatConfig(name='stdlib', description='An instruction set from the Python stdlib.')]
  DEFAULT_CONFIG_NAME = 'stdlib'

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({'messages': tfds.features.Text(), 'source': tfds.features.Text()}))

  def _conversations(self):
    config = self.builder_config
    if config.files is None:
      for key, messages in stdlib_conversations():
        yield key, messages, key
      return
    root, paths = text.resolve(config.files)
    if not paths:
      raise FileNotFoundError(f'data.files={config.files!r} matches no file; point it at chat JSONL files.')
    yield from jsonl_conversations(root, paths, config.on_bad_line)

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = {'train': [], 'validation': [], 'test': []}
    seen = set()
    for key, messages, source in self._conversations():
      if key in seen:  # A repeated conversation is kept once (TFDS keys must be unique).
        continue
      seen.add(key)
      splits[split_of(key)].append((key, messages, source))
    # TFDS refuses an empty split; one that a small file leaves empty is absent (reading it names it).
    return {name: self._generate_examples(items) for name, items in splits.items() if items}

  def _generate_examples(self, items):
    for key, messages, source in items:
      yield hashlib.sha256(key.encode('utf-8')).hexdigest(), {'messages': json.dumps(messages), 'source': source}
