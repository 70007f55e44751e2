"""grain input pipelines over the digits dataset: process shares, determinism, resume, eval padding, mixing, repeated
augmentation."""
import itertools

import ml_collections
import numpy as np
import pytest

from data import pipeline

AUGMENT = 'random_crop(6)|resize(8)|flip_lr|value_range(-1, 1)|onehot(10)'


def config(data_dir, **kw):
  return ml_collections.ConfigDict(dict(name='digits', data_dir=data_dir, **kw))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def ids(batches, image_to_index):
  return [image_to_index(img) for b in batches for img in b['image']]


def test_train_batches_have_expected_dtypes_and_shapes(digits_dir):
  it = pipeline.make_train_iter(config(digits_dir, pp_train=AUGMENT), global_batch_size=16, seed=0)
  b = next(it)
  assert sorted(b) == ['image', 'label', 'labels']
  assert b['image'].dtype == np.float32 and b['image'].shape == (16, 8, 8, 1)
  assert b['label'].dtype == np.int32 and b['label'].shape == (16,)
  assert b['labels'].dtype == np.float32 and b['labels'].shape == (16, 10)
  np.testing.assert_array_equal(b['labels'].argmax(-1), b['label'])
  assert -1 <= b['image'].min() and b['image'].max() <= 1


def test_local_batch_is_global_over_process_count(digits_dir):
  it = pipeline.make_train_iter(config(digits_dir), global_batch_size=12, seed=0,
                                process_index=2, process_count=3)
  assert next(it)['image'].shape[0] == 4
  with pytest.raises(ValueError, match='multiple of process_count=3') as e:
    pipeline.make_train_iter(config(digits_dir), global_batch_size=10, seed=0, process_count=3)
  assert '\n' not in str(e.value)


def test_process_shares_are_disjoint_and_cover_an_epoch(digits_dir, image_to_index):
  per_process = []
  for p in range(3):
    it = pipeline.make_train_iter(config(digits_dir), global_batch_size=3, seed=0,
                                  process_index=p, process_count=3)
    per_process.append(ids(take(it, 479), image_to_index))  # 1437 / 3 = 479 examples each.
  sets = [set(s) for s in per_process]
  assert all(len(s) == 479 for s in sets)  # A third of an epoch, no repeats.
  assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
  assert set().union(*sets) == {i for i in range(1797) if i % 5}


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_together_read_exactly_the_one_process_batches(digits_dir, process_count):
  # 25 * 64 > 1437: the comparison crosses an epoch (a new permutation, fresh augmentations).
  cfg = config(digits_dir, pp_train=AUGMENT)
  single = take(pipeline.make_train_iter(cfg, global_batch_size=64, seed=4), 25)
  shares = [take(pipeline.make_train_iter(cfg, global_batch_size=64, seed=4, process_index=p,
                                          process_count=process_count), 25)
            for p in range(process_count)]
  together = [{k: np.concatenate([s[b][k] for s in shares]) for k in single[b]} for b in range(25)]
  assert_same_batches(together, single)


def test_each_epoch_is_a_new_permutation_of_the_split(digits_dir, image_to_index):
  it = pipeline.make_train_iter(config(digits_dir), global_batch_size=479, seed=3)
  stream = ids(take(it, 9), image_to_index)  # 9 * 479 = 3 epochs of the 1437 training digits.
  epochs = [stream[i * 1437:(i + 1) * 1437] for i in range(3)]
  assert all(set(e) == set(epochs[0]) and len(set(e)) == 1437 for e in epochs)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_shuffle_false_keeps_source_order(digits_dir, image_to_index):
  src = pipeline.get_source('digits', 'train', digits_dir)
  it = pipeline.make_train_iter(config(digits_dir, shuffle=False), global_batch_size=10, seed=0)
  want = [image_to_index(src[i]['image']) for i in range(30)]
  assert ids(take(it, 3), image_to_index) == want


def test_same_args_give_identical_batches_and_seed_matters(digits_dir):
  cfg = config(digits_dir, pp_train=AUGMENT)
  a = take(pipeline.make_train_iter(cfg, global_batch_size=32, seed=7), 5)
  b = take(pipeline.make_train_iter(cfg.to_dict(), global_batch_size=32, seed=7), 5)
  c = take(pipeline.make_train_iter(cfg, global_batch_size=32, seed=8), 5)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_augmentation_differs_between_epochs(digits_dir, image_to_index):
  # Without shuffling, position k of every epoch is the same example: its crop/flip must change.
  cfg = config(digits_dir, shuffle=False, pp_train='random_crop(5)|resize(8)|flip_lr')
  it = pipeline.make_train_iter(cfg, global_batch_size=1437, seed=0, process_count=3)
  e0, e1 = take(it, 2)
  np.testing.assert_array_equal(e0['label'], e1['label'])
  assert np.mean(np.any(e0['image'] != e1['image'], axis=(1, 2, 3))) > 0.5


@pytest.mark.parametrize('k, process_index, process_count', [
    (3, 0, 1), (25, 0, 1), (25, 1, 2)])  # 25 * 64 > 1437: the resumed part crosses an epoch.
def test_restoring_state_resumes_with_the_same_batches(digits_dir, k, process_index, process_count):
  cfg = config(digits_dir, pp_train=AUGMENT, num_threads=2, prefetch=3)
  shard = dict(process_index=process_index, process_count=process_count)
  it = pipeline.make_train_iter(cfg, global_batch_size=64, seed=1, **shard)
  take(it, k)
  state = it.get_state()
  expected = take(it, 5)
  fresh = pipeline.make_train_iter(cfg, global_batch_size=64, seed=1, **shard)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 5), expected)


def test_iterator_saves_and_restores_in_an_orbax_composite(digits_dir, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = config(digits_dir, pp_train=AUGMENT)
  it = pipeline.make_train_iter(cfg, global_batch_size=32, seed=5)
  take(it, 4)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 3)
  fresh = pipeline.make_train_iter(cfg, global_batch_size=32, seed=5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    restored = mngr.restore(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same_batches(take(restored['data'], 3), expected)


@pytest.mark.parametrize('global_batch_size,process_count,expected_num_batches', [
    (7, 1, 52), (64, 1, 6), (42, 3, 9), (99, 3, 4), (35, 7, 11)])
def test_eval_sees_every_example_exactly_once(digits_dir, image_to_index, global_batch_size,
                                              process_count, expected_num_batches):
  cfg = config(digits_dir, pp_eval='value_range(0, 1)')
  local = global_batch_size // process_count
  seen, num_batches = [], set()
  for p in range(process_count):
    make_batches, n = pipeline.make_eval_iter(cfg, global_batch_size=global_batch_size,
                                              process_index=p, process_count=process_count)
    assert n == 360
    batches = list(make_batches())
    assert all(b['mask'].dtype == bool and b['mask'].shape == (local,) for b in batches)
    assert all(b['image'].shape == (local, 8, 8, 1) for b in batches)
    assert_same_batches(list(make_batches()), batches)  # A fresh pass gives the same batches.
    num_batches.add(len(batches))
    seen += [image_to_index(np.rint(img * 255)) for b in batches for img in b['image'][b['mask']]]
  assert num_batches == {expected_num_batches}  # The same on every process; no spare batch.
  assert sorted(seen) == list(range(0, 1797, 5))


def test_eval_batches_do_not_depend_on_process_count(digits_dir):
  cfg = config(digits_dir, pp_eval='value_range(0, 1)')
  single = list(pipeline.make_eval_iter(cfg, global_batch_size=96)[0]())
  shares = [list(pipeline.make_eval_iter(cfg, global_batch_size=96, process_index=p, process_count=4)[0]())
            for p in range(4)]
  assert_same_batches([{k: np.concatenate([s[b][k] for s in shares]) for k in single[b]}
                       for b in range(len(single))], single)


def test_mix_with_several_processes_mixes_within_each_share(digits_dir):
  src = pipeline.get_source('digits', 'train', digits_dir)
  cfg = config(digits_dir, shuffle=False, pp_train='onehot(10)', mix=dict())
  labels = np.array([src[i]['label'] for i in range(32)])
  for p in range(2):
    b = next(pipeline.make_train_iter(cfg, global_batch_size=16, seed=0, process_index=p, process_count=2))
    assert b['image'].shape == (8, 8, 8, 1)
    np.testing.assert_allclose(b['labels'].sum(-1), 1.0, rtol=1e-6)
    # Process p mixes stream positions [16p, 16p + 16): MixUp (0..3 with 4..7), CutMix (8..11, 12..15).
    np.testing.assert_array_equal(b['label'], np.concatenate([labels[16 * p:16 * p + 4],
                                                              labels[16 * p + 8:16 * p + 12]]))


def test_missing_dataset_raises_one_line_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_source('mnist', 'train', str(tmp_path))  # Registered in TFDS, not prepared.
  msg = str(e.value)
  assert '\n' not in msg and str(tmp_path) in msg
  assert f'tfds build mnist --data_dir={tmp_path} --file_format=array_record' in msg
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_source('no_such_dataset_xyz', 'train', str(tmp_path))
  assert '\n' not in str(e.value) and 'no_such_dataset_xyz' in str(e.value)


def test_unknown_split_raises_one_line_listing_splits(digits_dir):
  with pytest.raises(ValueError) as e:
    pipeline.get_source('digits', 'validation', digits_dir)
  assert '\n' not in str(e.value) and "'validation'" in str(e.value)
  assert 'available splits: test, train' in str(e.value)
  assert len(pipeline.get_source('digits', 'train[:10]+test[-5:]', digits_dir)) == 15


def test_unknown_pp_op_fails_when_building_the_pipeline(digits_dir):
  with pytest.raises(ValueError, match="Unknown pp op 'no_such_op'") as e:
    pipeline.make_train_iter(config(digits_dir, pp_train='flip_lr|no_such_op(3)'),
                             global_batch_size=8, seed=0)
  assert '\n' not in str(e.value)


def test_pipeline_never_imports_tensorflow(run_without_tensorflow, tmp_path):
  # The pipeline, building the dataset included, must not import TensorFlow even where it is installed.
  run_without_tensorflow(f"""
      from data import pipeline
      cfg = dict(name='digits', data_dir={str(tmp_path / 'tfds')!r}, pp_train={AUGMENT!r})
      next(pipeline.make_train_iter(cfg, global_batch_size=8, seed=0))
      make_batches, _ = pipeline.make_eval_iter(cfg, global_batch_size=64)
      list(make_batches())
      """)


def test_train_iter_is_infinite(digits_dir):
  it = pipeline.make_train_iter(config(digits_dir), global_batch_size=500, seed=0)
  assert len(list(itertools.islice(it, 10))) == 10  # 5000 examples > 3 epochs.


MIX_PP = 'random_crop(6)|resize(8)|flip_lr|onehot(10)'
RA_AFTER = 'randaugment(2, 9, translate_const=3, cutout_const=2)|value_range(-1, 1)'


def test_mix_gives_soft_labels_summing_to_one_from_two_fresh_examples_each(digits_dir):
  src = pipeline.get_source('digits', 'train', digits_dir)
  cfg = config(digits_dir, shuffle=False, pp_train='onehot(10)', mix=dict())  # Reference defaults.
  b0, b1 = take(pipeline.make_train_iter(cfg, global_batch_size=16, seed=0), 2)
  assert sorted(b0) == ['image', 'label', 'labels']
  assert b0['image'].shape == (16, 8, 8, 1) and b0['labels'].shape == (16, 10)
  for b in (b0, b1):
    np.testing.assert_allclose(b['labels'].sum(-1), 1.0, rtol=1e-6)
    assert 0 <= b['image'].min() and b['image'].max() <= 255
  assert np.mean(b0['labels'].max(-1) < 0.999) > 0.5  # Mostly mixed.
  # Batch k mixes source examples [32k, 32k + 32): MixUp (0..7 with 8..15), CutMix (16..23, 24..31);
  # `label` keeps the first of each pair.
  labels = np.array([src[i]['label'] for i in range(64)])
  np.testing.assert_array_equal(b0['label'], np.concatenate([labels[0:8], labels[16:24]]))
  np.testing.assert_array_equal(b1['label'], np.concatenate([labels[32:40], labels[48:56]]))
  image = np.asarray(src[0]['image'], np.float32)
  partner = np.asarray(src[8]['image'], np.float32)
  assert labels[0] != labels[8]  # So the labels tell lambda: the image must use the same one.
  lam = b0['labels'][0, labels[0]]
  np.testing.assert_allclose(b0['image'][0], lam * image + (1 - lam) * partner, atol=1e-3)


def test_mix_pp_after_runs_on_the_mixed_examples(digits_dir):
  cfg = config(digits_dir, pp_train=MIX_PP,
               mix=dict(mixup_alpha=0.2, cutmix_alpha=1.0, pp_after=RA_AFTER))
  b = next(pipeline.make_train_iter(cfg, global_batch_size=16, seed=0))
  assert b['image'].dtype == np.float32 and b['image'].shape == (16, 8, 8, 1)
  assert -1 <= b['image'].min() and b['image'].max() <= 1 and b['image'].min() < 0
  np.testing.assert_allclose(b['labels'].sum(-1), 1.0, rtol=1e-6)


def test_mix_none_is_off(digits_dir):
  a = take(pipeline.make_train_iter(config(digits_dir, pp_train=MIX_PP), global_batch_size=8,
                                    seed=0), 2)
  b = take(pipeline.make_train_iter(config(digits_dir, pp_train=MIX_PP, mix=None),
                                    global_batch_size=8, seed=0), 2)
  assert_same_batches(a, b)


@pytest.mark.parametrize('k', [2, 12])  # 12 * 2 * 64 > 1437: the resumed part crosses an epoch.
def test_restoring_state_with_mixing_resumes_with_the_same_batches(digits_dir, k):
  cfg = config(digits_dir, pp_train=MIX_PP, num_threads=2, prefetch=3,
               mix=dict(mixup_alpha=0.4, cutmix_alpha=1.0, pp_after=RA_AFTER))
  it = pipeline.make_train_iter(cfg, global_batch_size=64, seed=1)
  take(it, k)
  state = it.get_state()
  expected = take(it, 4)
  fresh = pipeline.make_train_iter(cfg, global_batch_size=64, seed=1)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 4), expected)
  other_seed = take(pipeline.make_train_iter(cfg, global_batch_size=64, seed=2), 1)[0]
  assert not np.array_equal(other_seed['labels'], take(
      pipeline.make_train_iter(cfg, global_batch_size=64, seed=1), 1)[0]['labels'])


@pytest.mark.parametrize('mix,match', [
    (dict(mixup=0.2), r"Unknown mix field\(s\) \['mixup'\]"),
    (dict(mixup_alpha=0, cutmix_alpha=None), 'mixup_alpha or cutmix_alpha'),
    (dict(pp_after='no_such_op'), "Unknown pp op 'no_such_op'"),
])
def test_bad_mix_config_raises_one_line_value_error(digits_dir, mix, match):
  with pytest.raises(ValueError, match=match) as e:
    pipeline.make_train_iter(config(digits_dir, pp_train='onehot(10)', mix=mix),
                             global_batch_size=8, seed=0)
  assert '\n' not in str(e.value)


# Repeated augmentation (`augment_repeats`): the records of each batch, their copies' augmentations, the shuffle,
# resume, process shares and the config errors; records told apart by their image's bytes before augmentation.
REPEAT_AUGMENT = 'random_crop(6)|resize(8)|flip_lr|value_range(-1, 1)'


def record_ids(batches, image_to_index):
  return [[image_to_index(img) for img in b['image']] for b in batches]


@pytest.mark.parametrize('k', [2, 4])
def test_each_batch_is_distinct_records_each_repeated_k_times(digits_dir, image_to_index, k):
  raw = take(pipeline.make_train_iter(config(digits_dir, augment_repeats=k), global_batch_size=32, seed=5), 3)
  for ids in record_ids(raw, image_to_index):
    groups = [ids[i:i + k] for i in range(0, 32, k)]
    assert all(len(set(g)) == 1 for g in groups)  # Copies are consecutive.
    assert len({g[0] for g in groups}) == 32 // k  # And B / k records are distinct.


def test_copies_get_independent_augmentations(digits_dir, image_to_index):
  k = 4
  raw, augmented = (take(pipeline.make_train_iter(config(digits_dir, augment_repeats=k, pp_train=pp),
                                                  global_batch_size=64, seed=5), 2) for pp in ('', REPEAT_AUGMENT))
  differing = []
  for r, a in zip(raw, augmented):
    np.testing.assert_array_equal(a['label'], r['label'])  # The same records: pp does not move the stream.
    copies = a['image'].reshape(64 // k, k, -1)
    differing += [len({c.tobytes() for c in group}) for group in copies]
  # 2 flips x 9 crops: 4 independent draws coincide rarely; the same RNG for all copies would give 1 everywhere.
  assert np.mean(np.array(differing) == 1) < 0.05 and np.mean(differing) > 3


def test_the_shuffle_is_over_distinct_records_epoch_by_epoch(digits_dir, image_to_index):
  # The records in order are the stream without repeats: 4 x 1437 copies = 89.8 batches of 64, so 100 batches
  # cross into the second epoch and its new permutation.
  k, n = 4, 100
  plain = sum(record_ids(take(pipeline.make_train_iter(config(digits_dir), global_batch_size=64, seed=3),
                              n // k + 1), image_to_index), [])
  repeated = sum(record_ids(take(pipeline.make_train_iter(config(digits_dir, augment_repeats=k),
                                                          global_batch_size=64, seed=3), n), image_to_index), [])
  assert repeated[::k] == plain[:n * 64 // k]
  assert sorted(set(repeated[:1437 * k])) == sorted(set(plain[:1437])) and len(set(plain[:1437])) == 1437


@pytest.mark.parametrize('at, process_index, process_count', [(7, 0, 1), (30, 1, 2)])  # 30 x 48 / 3 < 1437.
def test_with_repeats_restoring_state_mid_epoch_resumes_with_the_same_batches(digits_dir, at, process_index, process_count):
  cfg = config(digits_dir, pp_train=REPEAT_AUGMENT, augment_repeats=3, num_threads=2, prefetch=3)
  shard = dict(process_index=process_index, process_count=process_count)
  it = pipeline.make_train_iter(cfg, global_batch_size=48, seed=1, **shard)
  take(it, at)
  state = it.get_state()
  expected = take(it, 4)
  fresh = pipeline.make_train_iter(cfg, global_batch_size=48, seed=1, **shard)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 4), expected)


@pytest.mark.parametrize('process_count', [2, 4])
def test_with_repeats_processes_together_read_exactly_the_one_process_batches(digits_dir, process_count):
  # 4 processes of a 24-row batch take 6 rows each: they split records' copies (k = 4) between them.
  cfg = config(digits_dir, pp_train=REPEAT_AUGMENT, augment_repeats=4)
  single = take(pipeline.make_train_iter(cfg, global_batch_size=24, seed=4), 6)
  shares = [take(pipeline.make_train_iter(cfg, global_batch_size=24, seed=4, process_index=p,
                                          process_count=process_count), 6) for p in range(process_count)]
  together = [{key: np.concatenate([s[b][key] for s in shares]) for key in single[b]} for b in range(6)]
  assert_same_batches(together, single)


def test_repeats_leave_the_epoch_size_and_the_default_unchanged(digits_dir):
  assert pipeline.num_train_examples(config(digits_dir, augment_repeats=4)) == 1437
  a = take(pipeline.make_train_iter(config(digits_dir, pp_train=REPEAT_AUGMENT), global_batch_size=8, seed=0), 2)
  b = take(pipeline.make_train_iter(config(digits_dir, pp_train=REPEAT_AUGMENT, augment_repeats=1),
                                    global_batch_size=8, seed=0), 2)
  assert_same_batches(a, b)


@pytest.mark.parametrize('kw, batch, match', [
    (dict(augment_repeats=3), 16, r'batch_size=16 is not a multiple of data.augment_repeats=3'),
    (dict(augment_repeats=0), 16, r'data.augment_repeats=0 must be a whole number >= 1'),
    (dict(augment_repeats=2.0), 16, r'data.augment_repeats=2.0 must be a whole number >= 1'),
    (dict(augment_repeats=2, pp_train='onehot(10)', mix=dict()), 16, r'cannot be combined with data.mix'),
])
def test_bad_repeats_raise_one_line_value_errors(digits_dir, kw, batch, match):
  with pytest.raises(ValueError, match=match) as e:
    pipeline.make_train_iter(config(digits_dir, **kw), global_batch_size=batch, seed=0)
  assert '\n' not in str(e.value) and '--config.data.' in str(e.value)
