"""Classification loss and eval sums against their formulas."""
import jax.numpy as jnp
import numpy as np
import pytest

from train import tasks


class _Fixed:
  """A stand-in model whose logits are given."""

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)

  def apply(self, variables, x, train=False, rngs=None):
    return self.logits


LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)


def _xent(logits, targets):
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -(targets * logp).sum(-1).mean()


@pytest.mark.parametrize('soft', [False, True])
def test_loss_with_label_smoothing_matches_formula(soft):
  task = tasks.make_task({'name': 'classification', 'label_smoothing': 0.1})
  labels = np.array([0, 2])
  onehot = np.eye(3, dtype=np.float32)[labels]
  targets = np.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]], np.float32) if soft else onehot
  batch = {'image': np.zeros((2, 1)), **({'labels': targets} if soft else {'label': labels})}
  loss, metrics = task.loss(_Fixed(LOGITS), None, batch, None, train=True)
  smoothed = targets * 0.9 + 0.1 / 3
  np.testing.assert_allclose(loss, _xent(LOGITS, smoothed), rtol=1e-6)
  np.testing.assert_allclose(metrics['train/accuracy'], 1.0)


def test_eval_sums_respect_the_mask():
  task = tasks.make_task({'name': 'classification'})
  batch = {'image': np.zeros((2, 1)), 'label': np.array([1, 2]), 'mask': np.array([False, True])}
  sums = task.eval_sums(_Fixed(LOGITS), None, batch)
  assert float(sums['count']) == 1.0 and float(sums['correct']) == 1.0
  np.testing.assert_allclose(sums['loss'], _xent(LOGITS[1:], np.eye(3)[[2]]), rtol=1e-6)


def test_unknown_task_is_one_line():
  with pytest.raises(ValueError, match="task.name='regression' is unknown"):
    tasks.make_task({'name': 'regression'})


class _Bigram:
  """A stand-in LM whose logits at each position are a fixed table row of the current token."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def apply(self, variables, tokens, segment_ids=None, positions=None, rngs=None):
    return self.table[tokens]


def test_language_model_loss_masks_segment_boundaries_and_padding():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(5, 5)).astype(np.float32)
  tokens = np.array([[1, 2, 3, 4, 1, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 0]])  # Two documents then padding.
  batch = {'tokens': tokens, 'segment_ids': segments, 'positions': np.array([[0, 1, 2, 0, 1, 0]])}
  task = tasks.make_task({'name': 'language_model'})
  loss, metrics = task.loss(_Bigram(table), None, batch, None, train=True)
  # Only 1->2, 2->3 (first document) and 4->1 (second) are predictions inside one document.
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  want = -np.mean([logp[1, 2], logp[2, 3], logp[4, 1]])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(metrics['train/tokens']) == 3.0
  sums = task.eval_sums(_Bigram(table), None, {**batch, 'mask': np.array([True])})
  summary = task.eval_summary({k: float(v) for k, v in sums.items()})
  np.testing.assert_allclose(summary['eval/perplexity'], np.exp(want), rtol=1e-5)
  assert summary['eval/tokens'] == 3.0
