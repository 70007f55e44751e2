"""The evaluation suite: evaluator checks, minival splits, EMA and raw evaluation in the loop (against a NumPy
evaluation of the same parameters), and `python -m train.evaluate` against what the loop logged."""
import collections
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from data import pipeline
from train import evaluate as evaluate_lib
from train import evaluation, loop, objectives
from train import metrics as metrics_lib
from train import workdir as workdir_lib
from train.study import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSIFICATION = objectives.make_objective({'name': 'classification'})


def _config(evals, **fields):
  return ml_collections.ConfigDict(dict(data=dict(name='digits', eval_split='test', pp_eval='p'), eval_every_steps=5,
                                        evals=evals, **fields))


def test_without_evals_one_unnamed_evaluator_keeps_the_old_keys():
  (spec,) = evaluation.specs(_config(None), CLASSIFICATION)
  assert spec.name is None and spec.data.eval_split == 'test' and spec.every_steps == 5
  assert spec.metrics is None and spec.key('eval', 'top5') == 'eval/top5'  # All the objective gives, as before.


def test_evaluators_override_the_data_config():
  minival, other = evaluation.specs(_config({'minival': {'split': 'train[90%:]', 'every_steps': 0},
                                             'other': {'name': 'mnist', 'pp': 'q', 'metrics': ('top5',)}}),
                                    CLASSIFICATION)
  assert (minival.data.eval_split, minival.data.pp_eval, minival.every_steps) == ('train[90%:]', 'p', 0)
  assert (other.data.name, other.data.pp_eval, other.data.eval_split, other.every_steps) == ('mnist', 'q', 'test', 5)
  assert other.key('eval_raw', 'top5') == 'eval_raw/other/top5' and other.metrics == ('top5',)
  assert not minival.due(10, is_last=True) and other.due(10, False) and other.due(7, True) and not other.due(7, False)


@pytest.mark.parametrize('evals, message', [
    ({'MiniVal': {}}, r"evaluator name 'MiniVal' must be lowercase"),
    ({'test': {'splt': 'test'}}, r'config.evals.test.splt is not an evaluator field'),
    ({'test': {'metrics': ('top1',)}}, r"config.evals.test.metrics=\['top1'\]: 'top1' is not a metric"),
    ({'test': {'metrics': ()}}, r'config.evals.test.metrics=\[\]: it is empty'),
    ({'test': {'every_steps': -1}}, r'config.evals.test.every_steps=-1 must be a whole number'),
    ({'test': {'split': 'a', 'eval_split': 'b'}}, r'config.evals.test sets both split and eval_split'),
    ({'test': 'test'}, r'config.evals.test must be a dict'),
])
def test_bad_evaluators_are_one_line(evals, message):
  with pytest.raises(ValueError, match=message) as error:
    evaluation.specs(_config(evals), CLASSIFICATION)
  assert '\n' not in str(error.value)


def test_minival_splits_helper():
  assert common.minival_splits() == ('train[:90%]', 'train[90%:]')
  assert common.minival_splits('train', percent=1) == ('train[:99%]', 'train[99%:]')
  assert common.minival_splits('train', percent=0.5) == ('train[:99.5%]', 'train[99.5%:]')
  for bad in (0, 100, 'ten'):
    with pytest.raises(ValueError, match='percent'):
      common.minival_splits('train', percent=bad)
  with pytest.raises(ValueError, match='already sliced'):
    common.minival_splits('train[:50%]')


def _records(split, data_dir):
  source = pipeline.get_source('digits', split, data_dir)
  return [(source[i]['image'].tobytes(), int(source[i]['label'])) for i in range(len(source))]


def test_minival_is_disjoint_from_training_and_together_the_whole_split(digits_dir):
  rest, minival = common.minival_splits('train', percent=10)
  rest, minival, whole = _records(rest, digits_dir), _records(minival, digits_dir), _records('train', digits_dir)
  assert (len(rest), len(minival), len(whole)) == (1293, 144, 1437)  # TFDS rounds 1293.3 to the closest record.
  assert len(set(whole)) == len(whole)  # No duplicate digits: content equality means the same record.
  assert not set(rest) & set(minival)
  assert collections.Counter(rest + minival) == collections.Counter(whole)
  assert rest + minival == whole  # The last 10% of the prepared order, so deterministic across runs.


def test_minival_eval_batches_are_the_same_for_one_and_two_processes(digits_dir):
  """144 minival digits in global batches of 32: 5 batches, the last with 16 masked padding rows."""
  config = ml_collections.ConfigDict(dict(
      data=dict(name='digits', data_dir=digits_dir, eval_split='test', pp_eval='keep("image", "label")',
                num_threads=1, prefetch=1),
      eval_every_steps=1, evals={'minival': {'split': common.minival_splits()[1]}}))
  (single,) = evaluation.build(config, CLASSIFICATION, global_batch_size=32)
  shares = [evaluation.build(config, CLASSIFICATION, global_batch_size=32, process_index=p, process_count=2)[0]
            for p in range(2)]
  assert single.count == shares[0].count == shares[1].count == 144
  one = list(single.batches())
  two = [list(s.batches()) for s in shares]
  assert len(one) == len(two[0]) == len(two[1]) == 5
  for b, batch in enumerate(one):
    joined = {k: np.concatenate([two[0][b][k], two[1][b][k]]) for k in batch}
    assert set(joined) == set(batch) == {'image', 'label', 'mask'}
    for k in batch:
      np.testing.assert_array_equal(joined[k], batch[k])
  mask = np.concatenate([b['mask'] for b in one])
  assert mask.sum() == 144 and not mask[144:].any()
  seen = [(np.asarray(img).astype(np.uint8).tobytes(), int(l))
          for b in one for img, l, m in zip(b['image'], b['label'], b['mask']) if m]
  assert seen == _records('train[90%:]', digits_dir)  # Every minival digit once, in order.


def _numpy_eval(model, params, records):
  """Loss, top-1, top-5 of `params` on raw digit records, with the pp 'value_range(-1, 1)' written out here."""
  images = np.stack([np.frombuffer(img, np.uint8).reshape(8, 8, 1) for img, _ in records]).astype(np.float32)
  labels = np.array([label for _, label in records])
  logits = np.asarray(jax.jit(model.apply)({'params': params}, images / 255 * 2 - 1), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  order = np.argsort(-logits, axis=-1, kind='stable')
  return {'loss': -logp[np.arange(len(labels)), labels].mean(), 'accuracy': (order[:, 0] == labels).mean(),
          'top5': (order[:, :5] == labels[:, None]).any(-1).mean(), 'examples': len(labels)}


METRICS = ('loss', 'accuracy', 'top5', 'examples')
TEST_SPLIT = 'test[:96]'


@pytest.fixture(scope='module')
def trained(digits_dir, tmp_path_factory, tiny_config):
  """A 3-step tiny run with EMA and two evaluators: minival every step, test (two metrics) every 2 steps; a
  checkpoint at every step. Gives (workdir, the loop's result, the eval keys logged by step)."""
  workdir = str(tmp_path_factory.mktemp('evaluated_run'))
  config = tiny_config(digits_dir, eval_every_steps=1, checkpoint_every_steps=1, eval_batch_size=48,
                       **{'optimizer.ema_decay': 0.5, 'data.eval_split': TEST_SPLIT})
  config.evals = {'minival': {'split': common.minival_splits()[1]},
                  'test': {'split': TEST_SPLIT, 'metrics': ('top5', 'accuracy'), 'every_steps': 2}}
  out = loop.train(config, workdir)
  logged = {r['step']: {k: v for k, v in r.items() if k.startswith('eval')}
            for r in metrics_lib.read_metrics(workdir)}
  return workdir, out, logged


def test_loop_evaluates_ema_and_raw_under_each_evaluator(trained, digits_dir):
  workdir, out, logged = trained
  minival = {f'{p}/minival/{m}' for p in ('eval', 'eval_raw') for m in METRICS}
  test = {f'{p}/test/{m}' for p in ('eval', 'eval_raw') for m in ('top5', 'accuracy')}
  assert [set(logged[s]) for s in (1, 2, 3)] == [minival, minival | test, minival | test]  # test: step 2 and last.
  assert logged[3]['eval/minival/loss'] != logged[3]['eval_raw/minival/loss']
  config = runs_config(workdir)
  model = loop.build_model(config)
  records = _records(common.minival_splits()[1], digits_dir)
  for prefix, params in (('eval', out['state']['ema']), ('eval_raw', out['state']['trainable'])):
    want = _numpy_eval(model, jax.device_get(params), records)
    for m in METRICS:
      np.testing.assert_allclose(logged[3][f'{prefix}/minival/{m}'], want[m], rtol=1e-5, err_msg=f'{prefix} {m}')
  assert out['eval'] == logged[3]
  assert sweep.finished(workdir)  # Its final record has eval/minival/loss, not eval/loss.


def runs_config(workdir):
  return ml_collections.ConfigDict(json.load(open(os.path.join(workdir, 'config.json'))))


def _evaluate(workdir, *args):
  return subprocess.run([sys.executable, '-m', 'train.evaluate', f'--workdir={workdir}', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _evaluations(workdir):
  path = os.path.join(workdir, evaluate_lib.RECORDS)
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def test_evaluate_command_repeats_the_loops_numbers(trained):
  workdir, _, logged = trained
  config_before = open(os.path.join(workdir, 'config.json')).read()
  before = len(_evaluations(workdir))
  done = _evaluate(workdir)
  assert done.returncode == 0, done.stderr
  record = _evaluations(workdir)[-1]
  assert len(_evaluations(workdir)) == before + 1
  assert record['step'] == 3 and record['overrides'] == [] and set(record) == {'step', 'overrides', 'metrics', 'time'}
  assert set(record['metrics']) == set(logged[3])
  for k, v in logged[3].items():
    np.testing.assert_allclose(record['metrics'][k], v, rtol=1e-6, err_msg=k)
  assert [l.split(' | ')[:2] for l in done.stdout.splitlines() if l.startswith('step')] == [
      ['step 3', f'eval/minival/loss {logged[3]["eval/minival/loss"]:.6g}'],
      ['step 3', f'eval/test/top5 {logged[3]["eval/test/top5"]:.6g}']]
  assert open(os.path.join(workdir, 'config.json')).read() == config_before


def test_evaluate_an_older_step_with_an_added_evaluator_while_the_workdir_is_locked(trained):
  """In process: a given step, overrides adding an evaluator (one never run in training) and changing the batch
  size, and the workdir's lock held as by a live run; then without evals (the unnamed evaluator, old keys)."""
  workdir, _, logged = trained
  overrides = [f'evals.again.split={TEST_SPLIT}', 'evals.again.every_steps=0', 'eval_batch_size=32']
  with workdir_lib.Lock(workdir):  # As if the run were still training: reading committed checkpoints is harmless.
    record = evaluate_lib.evaluate_checkpoint(workdir, 2, overrides)
  assert record['step'] == 2 and record['overrides'] == overrides and _evaluations(workdir)[-1] == record
  metrics = record['metrics']
  assert set(metrics) == set(logged[2]) | {f'{p}/again/{m}' for p in ('eval', 'eval_raw') for m in METRICS}
  for k, v in logged[2].items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)
    if '/test/' in k:  # The same split under another name, in batches of 32.
      np.testing.assert_allclose(metrics[k.replace('/test/', '/again/')], v, rtol=1e-5, err_msg=k)
  plain = evaluate_lib.evaluate_checkpoint(workdir, 2, ['evals=None'])['metrics']
  assert set(plain) == {f'{p}/{m}' for p in ('eval', 'eval_raw') for m in METRICS}
  assert plain['eval/examples'] == 96
  for k in ('eval/top5', 'eval_raw/accuracy'):
    np.testing.assert_allclose(plain[k], logged[2][k.replace('/', '/test/')], rtol=1e-5, err_msg=k)


def test_evaluate_refuses_bad_input_in_one_line(trained, tmp_path):
  workdir, _, _ = trained
  done = _evaluate(workdir, '--step=7')
  assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'has no step 7; it has [1, 2, 3]' in done.stderr and len(done.stderr.strip().splitlines()) == 1
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    evaluate_lib.evaluate_checkpoint(str(tmp_path))
  (tmp_path / 'config.json').write_text(open(os.path.join(workdir, 'config.json')).read())
  with pytest.raises(FileNotFoundError, match='neither params/ .* nor checkpoints/'):
    evaluate_lib.evaluate_checkpoint(str(tmp_path))
  for override, message in (('eval_batch_sise=8', r'--config.eval_batch_sise: no such field'),
                            ('model.width', r'write --config.KEY=VALUE'),
                            ('evals.Test.split=test', r"evaluator name 'Test'"),
                            ('eval_batch_size=36', r'eval_batch_size=36 is not divisible by the data-parallel size')):
    with pytest.raises(ValueError, match=message):
      evaluate_lib.evaluate_checkpoint(workdir, None, [override])
