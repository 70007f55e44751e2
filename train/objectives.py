"""What a model trains on: a task turns (model, params, batch) into a loss and metrics.

The loop looks a task up by `config.task.name`; a new kind of experiment adds a task here, not a branch in
the loop. Each task gives:
  example_input(batch) -> the model input of one example (shapes for init);
  loss(model, params, batch, rng, train) -> (scalar loss, dict of scalar metrics)
  eval_sums(model, params, batch) -> dict of per-batch sums (masked), which the loop adds up over the split;
  eval_summary(sums) -> the `eval/<name>` metrics.
"""
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Classification:
  """Softmax cross-entropy on images; labels are integer `label` or soft `labels` [b, classes]."""

  def __init__(self, label_smoothing: float = 0.0, input_key: str = 'image'):
    self.label_smoothing = label_smoothing
    self.input_key = input_key

  def example_input(self, batch):
    """One example of the model's input, for shape inference at init."""
    return batch[self.input_key][:1]

  def _targets(self, batch, num_classes):
    if 'labels' in batch:  # Soft labels, e.g. one-hot from the pipeline or mixed by MixUp/CutMix.
      targets = batch['labels'].astype(jnp.float32)
    else:
      targets = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    return optax.smooth_labels(targets, self.label_smoothing) if self.label_smoothing else targets

  def loss(self, model, params, batch, rng, train: bool):
    logits = model.apply({'params': params}, batch[self.input_key], train=train, rngs={'dropout': rng})
    logits = logits.astype(jnp.float32)
    targets = self._targets(batch, logits.shape[-1])
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = (logits.argmax(-1) == targets.argmax(-1)).mean()
    return loss, {'train/accuracy': accuracy}

  def eval_sums(self, model, params, batch):
    logits = model.apply({'params': params}, batch[self.input_key], train=False).astype(jnp.float32)
    labels = batch['labels'].argmax(-1) if 'labels' in batch else batch['label']
    mask = batch['mask'].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'loss': (losses * mask).sum(), 'correct': ((logits.argmax(-1) == labels) * mask).sum(),
            'count': mask.sum()}

  def eval_summary(self, sums: Mapping[str, float]) -> dict[str, float]:
    return {'eval/loss': sums['loss'] / sums['count'], 'eval/accuracy': sums['correct'] / sums['count'],
            'eval/examples': sums['count']}


class LanguageModel:
  """Next-token cross-entropy over packed rows of `tokens` with `segment_ids` and `positions`.

  Token t predicts token t+1 only inside one document: pairs that cross a segment boundary or touch padding
  (segment 0) are masked, and the loss is the mean over the remaining tokens (token-weighted).
  """

  def example_input(self, batch):
    return batch['tokens'][:1]

  def _token_losses(self, model, params, batch, rng, train):
    tokens, segments = batch['tokens'], batch['segment_ids']
    logits = model.apply({'params': params}, tokens, segment_ids=segments, positions=batch['positions'],
                         **({'rngs': {'dropout': rng}} if rng is not None else {}))
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    mask = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    if 'mask' in batch:  # Eval padding rows.
      mask = mask & batch['mask'][:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = logits.argmax(-1) == targets
    return losses, correct, mask.astype(jnp.float32)

  def loss(self, model, params, batch, rng, train: bool):
    losses, correct, mask = self._token_losses(model, params, batch, rng, train)
    count = jnp.maximum(mask.sum(), 1.0)
    return (losses * mask).sum() / count, {'train/accuracy': (correct * mask).sum() / count,
                                           'train/tokens': mask.sum()}

  def eval_sums(self, model, params, batch):
    losses, correct, mask = self._token_losses(model, params, batch, None, False)
    real = batch['segment_ids'] != 0
    if 'mask' in batch:
      real = real & batch['mask'][:, None]
    # 'count' is every real token seen (the loop checks it against the split), 'predicted' the scored pairs.
    return {'loss': (losses * mask).sum(), 'correct': (correct * mask).sum(), 'predicted': mask.sum(),
            'count': real.sum().astype(jnp.float32)}

  def eval_summary(self, sums: Mapping[str, float]) -> dict[str, float]:
    loss = sums['loss'] / max(sums['predicted'], 1.0)
    return {'eval/loss': loss, 'eval/perplexity': float(np.exp(loss)),
            'eval/accuracy': sums['correct'] / max(sums['predicted'], 1.0), 'eval/tokens': sums['predicted']}


TASKS = {'classification': Classification, 'language_model': LanguageModel}


def make_task(task_config: Mapping[str, Any]):
  kwargs = dict(task_config)
  name = kwargs.pop('name')
  if name not in TASKS:
    raise ValueError(f'task.name={name!r} is unknown; choose one of {sorted(TASKS)}.')
  return TASKS[name](**kwargs)
