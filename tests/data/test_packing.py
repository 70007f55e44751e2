"""Packing documents into rows, and the language-model train/eval pipelines built on it."""

import grain
import numpy as np
import pytest

from data import packing
from data import pipeline
from data import text
from data import tokenizers
from data.formats import base

BYTES = tokenizers.ByteTokenizer()


def check_row(row, seq_len):
  """Row invariants; returns the row's segments as lists of tokens."""
  assert set(row) == set(packing.FEATURES)
  assert all(v.dtype == np.int32 and v.shape == (seq_len,) for v in row.values())
  seg, pos, tok = row['segment_ids'], row['positions'], row['tokens']
  real = seg > 0
  n = int(real.sum())
  assert real[:n].all() and not real[n:].any()  # Padding only at the end.
  assert seg[0] == 1 or n == 0
  assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)  # 1, 1, 2, 2, 2, 3...
  segments = []
  for s in range(1, int(seg.max(initial=0)) + 1):
    idx = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
    segments.append(tok[idx].tolist())
  want_mask = np.zeros(seq_len, np.int32)
  want_mask[:-1] = real[:-1] & (seg[1:] == seg[:-1])
  np.testing.assert_array_equal(row['loss_mask'], want_mask)
  np.testing.assert_array_equal(row['targets'][:-1], np.where(want_mask[:-1], tok[1:], 0))
  assert not pos[~real].any() and not row['targets'][~real].any()
  return segments


@pytest.mark.parametrize('seq_len', [2, 7, 64])
def test_pack_keeps_every_token_once_in_order(seq_len):
  rng = np.random.default_rng(seq_len)
  docs = [np.concatenate([[1], rng.integers(3, 259, size=n), [2]]).astype(np.int32)
          for n in rng.integers(0, 150, size=60)]
  ds = grain.MapDataset.source(docs).map(lambda t: {'tokens': t}).to_iter_dataset()
  rows = list(packing.pack(ds, seq_len))
  assert len(rows) == packing.num_rows([len(d) for d in docs], seq_len)
  pieces = [piece for r in rows for piece in check_row(r, seq_len)]
  assert np.concatenate(pieces).tolist() == np.concatenate(docs).tolist()
  assert all((r['segment_ids'] > 0).all() for r in rows[:-1])  # Only the last row pads.


def test_pack_pads_with_the_pad_id_and_rejects_short_rows():
  ds = grain.MapDataset.source([np.arange(3, 8, dtype=np.int32)]).map(lambda t: {'tokens': t})
  (row,) = list(packing.pack(ds.to_iter_dataset(), 8, pad_id=9))
  assert row['tokens'].tolist() == [3, 4, 5, 6, 7, 9, 9, 9]
  with pytest.raises(ValueError, match='seq_len'):
    packing.pack(ds.to_iter_dataset(), 1)


def _docs(seed, count=60):
  rng = np.random.default_rng(seed)
  return [np.concatenate([[1], rng.integers(3, 259, size=n), [2]]).astype(np.int32)
          for n in rng.integers(0, 150, size=count)]


def _stream(docs):
  return grain.MapDataset.source(docs).map(lambda t: {'tokens': t}).to_iter_dataset()


@pytest.mark.parametrize('seq_len', [2, 7, 64])
def test_growing_pack_at_one_length_equals_grains_packer(seq_len):
  """One stage: row for row what grain's concat-then-split packing (`pack`) makes of the same stream."""
  docs = _docs(seq_len)
  ours = list(packing.pack_growing(_stream(docs), ((0, seq_len),), rows_per_step=3))
  theirs = list(packing.pack(_stream(docs), seq_len))
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    for key in packing.FEATURES:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_growing_pack_follows_the_schedule_and_keeps_the_stream():
  """Rows of step s have the stage's length; every token appears once, in order, across the changes; the
  state taken inside the second stage resumes exactly."""
  docs, stages = _docs(1, count=200), ((0, 16), (5, 48), (9, 96))
  rows = list(packing.pack_growing(_stream(docs), stages, rows_per_step=2))
  for i, row in enumerate(rows[:-1]):
    step = i // 2
    assert len(row['tokens']) == packing.stage_length(stages, step) == (16 if step < 5 else 48 if step < 9 else 96)
  pieces = [piece for r in rows for piece in check_row(r, len(r['tokens']))]
  assert np.concatenate(pieces).tolist() == np.concatenate(docs).tolist()
  it = iter(packing.pack_growing(_stream(docs), stages, rows_per_step=2))
  for _ in range(13):  # step 6, in the second stage, a document cut at the last row's end
    next(it)
  state = it.get_state()
  fresh = iter(packing.pack_growing(_stream(docs), stages, rows_per_step=2))
  fresh.set_state(state)
  for a, b in zip([next(fresh) for _ in range(8)], rows[13:21]):
    for key in packing.FEATURES:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('stages, message', [
    (((1, 16),), 'must start at step 0'),
    (((0, 16), (0, 32)), 'the start steps must increase'),
    (((0, 16), (4, 1)), 'every seq_len be >= 2'),
    ((16, 32), 'is not a sequence of \\(start_step, seq_len\\) pairs'),
])
def test_bad_growing_schedules_are_one_line(stages, message):
  with pytest.raises(ValueError, match=message):
    packing.check_stages(stages)


def lm_config(data_dir, corpus, **kw):
  return dict(name='local_text', files=str(corpus / '**' / '*.txt'), data_dir=data_dir, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def split_docs(batches):
  """Texts of the byte-tokenized documents in stream order (documents start at bos)."""
  stream = np.concatenate([b['tokens'][b['segment_ids'] > 0] for b in batches]).tolist()
  docs, cur = [], None
  for t in stream:
    if t == BYTES.bos_id:
      cur = []
    elif t == BYTES.eos_id:
      docs.append(BYTES.decode(cur))
      cur = None
    else:
      cur.append(t)
  return docs


def source_texts(data_dir, corpus, split):
  src = pipeline.get_source('local_text', split, data_dir,
                            builder_config=text.files_config(str(corpus / '**' / '*.txt')))
  return [bytes(src[i]['text']).decode() for i in range(len(src))]


def test_train_rows_and_process_slices(text_dir, text_corpus):
  train = source_texts(text_dir, text_corpus, 'train')
  seen = []
  for p in range(3):
    it = pipeline.make_lm_train_iter(lm_config(text_dir, text_corpus, seq_len=128),
                                     global_batch_size=12, seed=0, process_index=p,
                                     process_count=3)
    batches = take(it, 30)
    for b in batches:
      for r in range(4):
        check_row({k: v[r] for k, v in b.items()}, 128)
    lo, hi = base.process_bounds(len(train), p, 3)
    docs = split_docs(batches)
    assert len(docs) > 2 * (hi - lo)
    assert sorted(docs[:hi - lo]) == sorted(train[lo:hi])  # Epoch 1: a permutation of the slice.
    assert sorted(docs[hi - lo:2 * (hi - lo)]) == sorted(train[lo:hi])
    assert docs[:hi - lo] != docs[hi - lo:2 * (hi - lo)]  # Reshuffled per epoch.
    seen.append(set(docs[:hi - lo]))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set().union(*seen) == set(train)


def test_same_seed_same_batches_and_seed_matters(text_dir, text_corpus):
  cfg = lm_config(text_dir, text_corpus, seq_len=16)
  a = take(pipeline.make_lm_train_iter(cfg, global_batch_size=4, seed=1), 5)
  b = take(pipeline.make_lm_train_iter(cfg, global_batch_size=4, seed=1), 5)
  c = take(pipeline.make_lm_train_iter(cfg, global_batch_size=4, seed=2), 5)
  assert all(np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, b))
  assert not all(np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, c))


@pytest.mark.parametrize('k', [1, 7, 40])  # 40 batches cross an epoch of the documents.
def test_restoring_state_resumes_exactly(text_dir, text_corpus, k):
  cfg = lm_config(text_dir, text_corpus, seq_len=48, num_threads=2, prefetch=3)
  it = pipeline.make_lm_train_iter(cfg, global_batch_size=4, seed=3, process_index=1,
                                   process_count=2)
  take(it, k)
  state = it.get_state()
  expected = take(it, 6)
  fresh = pipeline.make_lm_train_iter(cfg, global_batch_size=4, seed=3, process_index=1,
                                      process_count=2)
  fresh.set_state(state)
  for x, y in zip(take(fresh, 6), expected):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize('process_count,global_batch_size,seq_len', [(1, 3, 40), (3, 6, 24),
                                                                     (3, 3, 200)])
def test_eval_covers_every_token_once(text_dir, text_corpus, process_count, global_batch_size,
                                      seq_len):
  cfg = lm_config(text_dir, text_corpus, seq_len=seq_len)
  val = source_texts(text_dir, text_corpus, 'validation')
  want_tokens = sum(len(BYTES.encode(t)) + 2 for t in val)
  docs, counts, total = [], set(), 0
  for p in range(process_count):
    make, n = pipeline.make_lm_eval_iter(cfg, global_batch_size=global_batch_size,
                                         process_index=p, process_count=process_count)
    assert n == want_tokens
    batches = list(make())
    assert all(b['tokens'].shape == (global_batch_size // process_count, seq_len)
               for b in batches)
    for b in batches:
      for r in range(len(b['tokens'])):
        check_row({k: v[r] for k, v in b.items()}, seq_len)
    again = list(make())
    assert all(np.array_equal(x['tokens'], y['tokens']) for x, y in zip(batches, again))
    counts.add(len(batches))
    total += sum(int((b['segment_ids'] > 0).sum()) for b in batches)
    docs += split_docs(batches)
  assert len(counts) == 1 and total == want_tokens
  assert docs == val  # Split order, each document once, processes in order.


def test_bad_lm_configs_raise_one_line_errors(text_dir, text_corpus):
  for cfg, err in [(lm_config(text_dir, text_corpus), ValueError),
                   (lm_config(text_dir, text_corpus, seq_len=8, tokenizer='gpt2'), ValueError)]:
    with pytest.raises(err) as e:
      pipeline.make_lm_train_iter(cfg, global_batch_size=2, seed=0)
    assert '\n' not in str(e.value)


def test_lm_pipeline_with_sentencepiece(text_dir, text_corpus, tmp_path):
  model = tokenizers.train_sentencepiece(source_texts(text_dir, text_corpus, 'train'),
                                         str(tmp_path / 'sp'), vocab_size=400)
  tok = tokenizers.get_tokenizer(model)
  cfg = lm_config(text_dir, text_corpus, seq_len=32, tokenizer=model)
  make, n = pipeline.make_lm_eval_iter(cfg, global_batch_size=2)
  batches = list(make())
  stream = np.concatenate([b['tokens'][b['segment_ids'] > 0] for b in batches]).tolist()
  assert len(stream) == n
  val = source_texts(text_dir, text_corpus, 'validation')
  assert stream == [i for t in val for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
  b = next(pipeline.make_lm_train_iter(cfg, global_batch_size=2, seed=0))
  assert b['tokens'].max() < tok.vocab_size


def test_lm_pipeline_never_imports_tensorflow(run_without_tensorflow, tmp_path, text_corpus):
  run_without_tensorflow(f"""
      from data import pipeline
      cfg = dict(files={str(text_corpus / '**' / '*.txt')!r}, data_dir={str(tmp_path / 'tfds')!r},
                 seq_len=16)
      next(pipeline.make_lm_train_iter(cfg, global_batch_size=2, seed=0))
      make_batches, _ = pipeline.make_lm_eval_iter(cfg, global_batch_size=2)
      list(make_batches())
      """)
