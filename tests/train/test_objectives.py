"""Objectives against their formulas: classification and language-model losses, eval sums, FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import objectives


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
  task = objectives.make_objective({'name': 'classification', 'label_smoothing': 0.1})
  labels = np.array([0, 2])
  onehot = np.eye(3, dtype=np.float32)[labels]
  targets = np.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]], np.float32) if soft else onehot
  batch = {'image': np.zeros((2, 1)), **({'labels': targets} if soft else {'label': labels})}
  loss, metrics = objectives.mean_loss(task, _Fixed(LOGITS), None, {}, batch, None, train=True)
  smoothed = targets * 0.9 + 0.1 / 3
  np.testing.assert_allclose(loss, _xent(LOGITS, smoothed), rtol=1e-6)
  np.testing.assert_allclose(metrics['train/accuracy'], 1.0)


def test_eval_sums_respect_the_mask():
  task = objectives.make_objective({'name': 'classification'})
  batch = {'image': np.zeros((2, 1)), 'label': np.array([1, 2]), 'mask': np.array([False, True])}
  sums = task.eval_sums(_Fixed(LOGITS), None, {}, batch)
  assert float(sums['count']) == 1.0 and float(sums['correct']) == 1.0
  np.testing.assert_allclose(sums['loss'], _xent(LOGITS[1:], np.eye(3)[[2]]), rtol=1e-6)


def _numpy_top_k_correct(logits, labels, mask, k):
  """Masked count of labels among the k first classes of a stable descending sort (ties: lower index first)."""
  order = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  return int(((order == labels[:, None]).any(-1) & mask).sum())


@pytest.mark.parametrize('classes, integer_logits', [(50, False), (12, True), (3, False)])
def test_top5_and_accuracy_match_a_numpy_count(classes, integer_logits):
  """Random logits (integer-valued ones make ties, which go to the lower class index), a quarter of the rows
  padding (mask False); with 3 classes every label is in the top 5."""
  rng = np.random.default_rng(classes)
  n = 64
  logits = rng.integers(-2, 3, (n, classes)).astype(np.float32) if integer_logits else rng.standard_normal(
      (n, classes), dtype=np.float32)
  labels = rng.integers(0, classes, n)
  mask = rng.random(n) > 0.25
  task = objectives.make_objective({'name': 'classification'})
  sums = task.eval_sums(_Fixed(logits), None, {}, {'image': np.zeros((n, 1)), 'label': labels, 'mask': mask})
  summary = task.eval_summary({k: float(v) for k, v in sums.items()})
  real = int(mask.sum())
  top5, top1 = _numpy_top_k_correct(logits, labels, mask, 5), _numpy_top_k_correct(logits, labels, mask, 1)
  assert float(sums['correct5']) == top5 and float(sums['correct']) == top1
  assert summary['examples'] == real
  np.testing.assert_allclose(summary['top5'], top5 / real, rtol=1e-7)
  np.testing.assert_allclose(summary['accuracy'], top1 / real, rtol=1e-7)
  if classes < 5:
    assert summary['top5'] == 1.0
  else:
    assert 0 < top5 < real  # The case can fail either way.
  if integer_logits:  # Ties decided the answer for some rows: the rule is exercised, not assumed.
    label_logit = logits[np.arange(n), labels]
    assert ((logits == label_logit[:, None]).sum(-1) > 1).any()


def test_top5_ties_follow_lax_top_k():
  """The documented tie rule is jax.lax.top_k's: among equal logits the lower class index ranks first."""
  logits = np.array([[1.0] * 8, [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]], np.float32)
  for label in range(8):
    labels = np.array([label, label])
    want = (np.asarray(jax.lax.top_k(jnp.asarray(logits), 5)[1]) == label).any(-1)
    got = np.asarray(objectives.label_rank(jnp.asarray(logits), jnp.asarray(labels))) < 5
    np.testing.assert_array_equal(got, want)


def test_unknown_task_is_one_line():
  with pytest.raises(ValueError, match="task.name='regression' is unknown"):
    objectives.make_objective({'name': 'regression'})


class _Bigram:
  """A stand-in LM whose logits at each position are a fixed table row of the current token."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def apply(self, variables, tokens, segment_ids=None, positions=None, train=False, rngs=None):
    return self.table[tokens]


def test_language_model_loss_masks_segment_boundaries_and_padding():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(5, 5)).astype(np.float32)
  tokens = np.array([[1, 2, 3, 4, 1, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 0]])  # Two documents then padding.
  # What the packed-text pipeline gives: each token's successor inside its document, weight 1 where there is one.
  targets = np.array([[2, 3, 0, 1, 0, 0]])
  loss_mask = np.array([[1, 1, 0, 1, 0, 0]])
  batch = {'tokens': tokens, 'segment_ids': segments, 'positions': np.array([[0, 1, 2, 0, 1, 0]]),
           'targets': targets, 'loss_mask': loss_mask}
  task = objectives.make_objective({'name': 'language_model'})
  loss, metrics = objectives.mean_loss(task, _Bigram(table), None, {}, batch, None, train=True)
  # Only 1->2, 2->3 (first document) and 4->1 (second) are predictions inside one document.
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  want = -np.mean([logp[1, 2], logp[2, 3], logp[4, 1]])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(metrics['train/tokens']) == 3.0
  sums = task.eval_sums(_Bigram(table), None, {}, {**batch, 'mask': np.array([True])})
  summary = task.eval_summary({k: float(v) for k, v in sums.items()})
  np.testing.assert_allclose(summary['perplexity'], np.exp(want), rtol=1e-5)
  assert summary['tokens'] == 3.0


def test_language_model_honours_zero_loss_weights_from_the_data():
  """Tokens the data weights 0 (a chat prompt, say) leave the loss, its gradient and the token count."""
  rng = np.random.default_rng(1)
  table = rng.normal(size=(6, 6)).astype(np.float32)
  tokens = np.array([[1, 2, 3, 4, 5, 1]])
  targets = np.array([[2, 3, 4, 5, 1, 0]])
  weights = np.array([[0, 0, 1, 1, 1, 0]], np.float32)  # Only the last three predictions count.
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'positions': np.arange(6)[None],
           'targets': targets, 'loss_mask': weights}
  task = objectives.make_objective({'name': 'language_model'})
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  loss, metrics = objectives.mean_loss(task, _Bigram(table), None, {}, batch, None, train=True)
  np.testing.assert_allclose(loss, -np.mean([logp[3, 4], logp[4, 5], logp[5, 1]]), rtol=1e-6)
  assert float(metrics['train/tokens']) == 3.0
  # The zero-weight targets do not matter at all: change them and nothing moves, gradient included.
  changed = {**batch, 'targets': np.array([[5, 5, 4, 5, 1, 0]])}

  def loss_of(table, b):
    return objectives.mean_loss(task, _Bigram(table), None, {}, b, None, train=True)[0]
  g1, g2 = jax.grad(loss_of)(jnp.asarray(table), batch), jax.grad(loss_of)(jnp.asarray(table), changed)
  np.testing.assert_array_equal(g1, g2)
  assert float(np.abs(np.asarray(g1)[1]).sum()) == 0.0  # Row 1 is only used to predict weight-0 targets.


@pytest.mark.parametrize('name', ['classification', 'language_model'])
def test_training_flops_are_forward_plus_backward_of_trained_weights(name):
  task = objectives.make_objective({'name': name})
  assert task.train_flops_per_example(1e9) == 3e9  # Everything trains: forward + 2x backward.
  # Frozen weights need no weight gradient; the activation gradient still flows: 2F + fraction * F.
  assert task.train_flops_per_example(1e9, trainable_fraction=0.25) == pytest.approx(2.25e9)
