"""The offline `local_text` TFDS builder: corpora, the documented split rule, determinism."""
import os
import sysconfig

import pytest
import tensorflow_datasets as tfds

from data import pipeline
from data import text

NUM_FILES = 150

def expected_splits(root):
  rel = sorted(os.path.relpath(p, root) for p in root.rglob('*.txt'))
  return {s: sorted(r for r in rel if text.split_of(r) == s) for s in ('train', 'validation')}


def test_split_counts_and_contents_follow_the_hash_rule(text_corpus, text_dir):
  files = str(text_corpus / '**' / '*.txt')
  builder = tfds.builder('local_text', config=text.files_config(files), data_dir=text_dir)
  assert builder.is_prepared() and builder.info.file_format.value == 'array_record'
  want = expected_splits(text_corpus)
  assert len(want['validation']) >= 1 and len(want['train']) + len(want['validation']) == 150
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      s: len(v) for s, v in want.items()}
  for split, rels in want.items():
    src = pipeline.get_source('local_text', split, text_dir,
                              builder_config=text.files_config(files))
    got = {bytes(src[i]['path']).decode(): bytes(src[i]['text']).decode() for i in range(len(src))}
    assert sorted(got) == rels
    assert all(got[r] == (text_corpus / r).read_text('utf-8') for r in rels)


def test_split_rule_is_stable_and_about_two_percent():
  names = [f'dir/file{i}.py' for i in range(20000)]
  val = [n for n in names if text.split_of(n) == 'validation']
  assert 0.015 < len(val) / len(names) < 0.025
  assert val == [n for n in names if text.split_of(n) == 'validation']


def test_rebuilding_gives_identical_sources(text_corpus, text_dir, tmp_path):
  cfg = text.files_config(str(text_corpus / '**' / '*.txt'))
  again = str(tmp_path / 'again')
  for split in ('train', 'validation'):
    a = pipeline.get_source('local_text', split, text_dir, builder_config=cfg)
    b = pipeline.get_source('local_text', split, again, builder_config=cfg)
    assert [a[i]['path'] for i in range(len(a))] == [b[i]['path'] for i in range(len(b))]


def test_custom_config_reads_the_glob_from_the_environment(text_corpus, tmp_path, monkeypatch):
  monkeypatch.setenv(text.ENV_VAR, str(text_corpus / 'a'))  # A directory: all files below it.
  src = pipeline.get_source('local_text/custom', 'train+validation', str(tmp_path))
  paths = sorted(bytes(src[i]['path']).decode() for i in range(len(src)))
  assert paths == sorted(['skip.bin'] + [f'doc{i:03d}.txt' for i in range(1, NUM_FILES, 2)])
  monkeypatch.delenv(text.ENV_VAR)
  with pytest.raises(ValueError, match=text.ENV_VAR):
    tfds.builder('local_text/custom', data_dir=str(tmp_path / 'other')).download_and_prepare()


def test_files_config_name_depends_on_the_glob_and_the_files(tmp_path):
  a, b = text.files_config('/x/*.txt'), text.files_config('/y/*.txt')
  assert a.name.startswith('custom_') and a.name != b.name
  assert a.name == text.files_config('/x/*.txt').name
  # A file rewritten in place (a pipeline stage run again) is prepared again, never read from the stale copy.
  from data import chat_data
  path = tmp_path / 'chat.jsonl'
  path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  names = [text.files_config(str(tmp_path / '*.jsonl')).name, chat_data.files_config(str(path)).name]
  assert names == [text.files_config(str(tmp_path / '*.jsonl')).name, chat_data.files_config(str(path)).name]
  path.write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')
  assert text.files_config(str(tmp_path / '*.jsonl')).name != names[0]
  assert chat_data.files_config(str(path)).name != names[1]


def test_default_config_is_the_stdlib_top_level_py_files():
  builder = tfds.builder('local_text', data_dir='/nonexistent')
  assert builder.builder_config.name == 'stdlib'
  root, paths = builder.builder_config.corpus()
  assert root == sysconfig.get_paths()['stdlib']
  assert paths == sorted(paths) and len(paths) > 50
  assert all(os.path.isfile(p) and p.endswith('.py') and os.path.dirname(p) == root
             for p in paths)
  assert os.path.join(root, 'argparse.py') in paths
  total = sum(os.path.getsize(p) for p in paths)
  assert 1e6 < total < 20e6, total
  splits = [text.split_of(os.path.relpath(p, root)) for p in paths]
  assert 'validation' in splits and 'train' in splits
