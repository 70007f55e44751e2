"""The data-format registry: lookup, errors, defaults, and a new format plugged in from outside."""
import grain
import ml_collections
import numpy as np
import pytest

from data import formats
from data import packing
from data import pipeline
from data.formats import base


def test_registry_lists_the_formats_and_examples_is_the_default():
  assert sorted(formats.FORMATS) == ['chat', 'examples', 'packed_text', 'preference']
  assert isinstance(formats.FORMATS['chat'], formats.Chat)
  assert isinstance(formats.FORMATS['examples'], formats.Examples)
  assert isinstance(formats.FORMATS['packed_text'], formats.PackedText)
  for cfg in ({}, {'format': None}, {'format': ''}, ml_collections.ConfigDict({'name': 'digits'})):
    assert formats.get_format(cfg) is formats.FORMATS['examples']
  cfg = ml_collections.ConfigDict({'format': 'packed_text', 'seq_len': 8})
  assert formats.get_format(cfg) is formats.FORMATS['packed_text']


@pytest.mark.parametrize('call', [
    lambda cfg: pipeline.make_train_iter(cfg, global_batch_size=8, seed=0),
    lambda cfg: pipeline.make_eval_iter(cfg, global_batch_size=8),
    pipeline.num_train_examples,
    formats.get_format,
])
def test_unknown_format_raises_one_line_naming_the_known_ones(call):
  with pytest.raises(ValueError) as e:
    call({'format': 'dialogue', 'name': 'digits'})
  msg = str(e.value)
  assert '\n' not in msg
  assert "data.format='dialogue' is unknown; known formats: 'chat', 'examples', 'packed_text', 'preference'." == msg


def test_every_format_has_the_common_defaults_and_cfg_fills_them():
  for fmt in formats.FORMATS.values():
    assert fmt.name and {**fmt.defaults, **formats.COMMON_DEFAULTS} == dict(fmt.defaults)
  text = formats.FORMATS['packed_text']
  assert text.cfg({'eval_split': None, 'prefetch': 9}, 'eval_split') == 'validation'
  assert text.cfg({'prefetch': 9}, 'prefetch') == 9
  assert formats.FORMATS['examples'].cfg({}, 'eval_split') == 'test'
  with pytest.raises(KeyError):
    formats.FORMATS['examples'].cfg({}, 'name')  # No default: required.


class Ramp(formats.DataFormat):
  """A toy format: row i of the global stream is {'x': start + seed + i}."""
  name = 'test_ramp'
  defaults = {**formats.COMMON_DEFAULTS, 'start': 100, 'size': 1000}

  def train_iter(self, config, *, global_batch_size, seed, process_index, process_count):
    start = self.cfg(config, 'start') + seed
    ds = grain.MapDataset.range(self.cfg(config, 'size')).repeat()
    ds = ds.map(lambda i: {'x': np.int32(start + i)})
    ds = ds.batch(base.local_batch_size(global_batch_size, process_count), drop_remainder=True)
    ds = base.process_share(ds, process_index, process_count)
    return iter(ds.to_iter_dataset(self.read_options(config)))

  def eval_iter(self, config, *, global_batch_size, process_index, process_count):
    rows = np.arange(global_batch_size, dtype=np.int32)[process_index::process_count]
    return (lambda: iter([{'x': rows}])), global_batch_size

  def num_train_examples(self, config):
    return int(self.cfg(config, 'size'))


@pytest.fixture
def ramp(monkeypatch):
  monkeypatch.setattr(formats, 'FORMATS', dict(formats.FORMATS))  # Registered for this test only.
  return formats.register(Ramp())


def test_a_registered_format_is_dispatched_by_the_pipeline(ramp):
  cfg = ml_collections.ConfigDict({'format': 'test_ramp', 'start': 5, 'num_threads': 1})
  assert formats.get_format(cfg) is ramp
  it = pipeline.make_train_iter(cfg, global_batch_size=4, seed=1, process_index=1, process_count=2)
  # Global batches of 4 from 6: [6..9], [10..13], ...; process 1 of 2 reads the second half.
  assert [next(it)['x'].tolist() for _ in range(2)] == [[8, 9], [12, 13]]
  state = it.get_state()
  want = next(it)['x'].tolist()
  fresh = pipeline.make_train_iter(cfg, global_batch_size=4, seed=1, process_index=1,
                                   process_count=2)
  fresh.set_state(state)
  assert next(fresh)['x'].tolist() == want == [16, 17]
  make, n = pipeline.make_eval_iter(cfg, global_batch_size=6, process_index=0, process_count=2)
  assert n == 6 and [b['x'].tolist() for b in make()] == [[0, 2, 4]]
  assert pipeline.num_train_examples(cfg) == 1000
  assert pipeline.num_train_examples({'format': 'test_ramp', 'size': 7}) == 7


def test_register_refuses_duplicates_and_non_formats(ramp):
  with pytest.raises(ValueError, match="'test_ramp' is already registered") as e:
    formats.register(Ramp())
  assert '\n' not in str(e.value)
  replacement = formats.register(Ramp(), replace=True)
  assert formats.FORMATS['test_ramp'] is replacement is not ramp
  with pytest.raises(TypeError):
    formats.register(object())
  with pytest.raises(TypeError):
    formats.DataFormat()  # pylint: disable=abstract-class-instantiated


def lm_config(text_dir, text_corpus, **kw):
  return dict(format='packed_text', name='local_text', files=str(text_corpus / '**' / '*.txt'),
              data_dir=text_dir, **kw)


def test_packed_text_batches_carry_targets_and_loss_mask(text_dir, text_corpus):
  cfg = lm_config(text_dir, text_corpus, seq_len=24)
  train = next(pipeline.make_train_iter(cfg, global_batch_size=4, seed=0))
  assert sorted(train) == sorted(packing.FEATURES)
  lm = next(pipeline.make_lm_train_iter(cfg, global_batch_size=4, seed=0))
  for k in packing.FEATURES:
    np.testing.assert_array_equal(train[k], lm[k], err_msg=k)
  # A global batch larger than the validation rows: the last rows are all padding.
  make, n = pipeline.make_eval_iter(cfg, global_batch_size=64)
  (batch,) = list(make())
  assert sorted(batch) == sorted(packing.FEATURES)
  assert all(v.dtype == np.int32 and v.shape == (64, 24) for v in batch.values())
  padding = ~(batch['segment_ids'] > 0).any(-1)
  assert 0 < padding.sum() < 64
  assert not batch['loss_mask'][padding].any() and not batch['targets'][padding].any()
  # Every real token but the last of each segment in a row has a next-token target of weight 1.
  assert int(batch['loss_mask'].sum()) == n - int(batch['segment_ids'].max(-1).sum())
