"""Objectives: what a run optimises, evaluates and pays for. The loop looks one up by `config.task.name`.

A new method is a new objective here (or an adapter, or a data format), never a branch in the loop or step.
Each objective gives:
  frozen_needs                 names of frozen parameter trees it reads besides the trainable ones (e.g.
                               ('reference',) for DPO with a frozen copy); the config provides each in
                               `config.frozen` (see train/loop.py).
  example_input(batch)         the model input of one example (shapes for init).
  loss(model, params, frozen, batch, rng, train) -> (loss_sum, sums)
                               the loss summed over the batch's units (examples, tokens, pairs) and additive
                               sums that include 'weight', the number of those units. The step divides by the
                               total weight, so micro-batches of any make-up add up to the full batch exactly.
  train_summary(sums)          the `train/<name>` metrics of a step's summed `sums` (jnp, inside the step).
  eval_sums(model, params, frozen, batch) -> per-batch sums (masked), added up over the split by the loop;
                               'count' is what the split's count (from the data pipeline) is checked against.
  eval_metrics                 the names eval_summary gives, which `config.evals.*.metrics` may choose from.
  eval_summary(sums)           the metrics by those names, unprefixed: train/evaluation.py logs them as
                               `eval/<metric>` or `eval/<evaluator>/<metric>` (`eval_raw/...` for the raw
                               parameters beside their EMA).
  train_flops_per_example(forward_flops, trainable_fraction)
                               analytic training FLOPs of one example given the model's forward FLOPs and the
                               adapter's trainable share of the parameters: the compute accounting asks this.
  synthetic_batch(config, batch_size, input_shape)
                               a batch of random data in the shape the pipeline gives (for benchmarks), with
  example_shape(image_size, channels, seq_len) the input shape of one example from a benchmark's sizes, and
  unit                         what throughput counts: 'examples' or 'tokens' (tokens per example: the length).
`params` are the model's whole parameters (the adapter has merged trainable and frozen parts); `frozen` is the
dict of frozen trees by name.
"""
from collections.abc import Mapping
import re
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import build, dpo


def backprop_flops(forward_flops: float, trainable_fraction: float) -> float:
  """A forward pass and its backward: gradients of the activations (about one forward) and of the trained
  weights (one forward's worth scaled by the trainable share): 3x forward when everything trains."""
  return forward_flops * (2.0 + trainable_fraction)


def label_rank(logits, labels):
  """How many classes rank ahead of each example's label (0: top-1): a larger logit, or an equal one at a lower
  class index. A count rather than a sort: O(classes) per example, and the tie rule is explicit."""
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  lower = jnp.arange(logits.shape[-1]) < labels[:, None]
  return ((logits > label_logit) | ((logits == label_logit) & lower)).sum(-1)


class Classification:
  """Softmax cross-entropy on images; labels are integer `label` or soft `labels` [b, classes] (evaluated
  against their argmax).

  Eval metrics: loss, accuracy (top-1), top5 and examples. An example is top-k correct when fewer than k
  classes rank ahead of its label, where class j ranks ahead of label y if its logit is larger, or equal
  with j < y: ties go to the lower class index, as argmax and jax.lax.top_k break them, so accuracy is
  exactly the top-1 of this rule. With fewer than 5 classes top5 is 1.
  """
  frozen_needs: tuple[str, ...] = ()
  unit = 'examples'
  eval_metrics = ('loss', 'accuracy', 'top5', 'examples')

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

  def loss(self, model, params, frozen, batch, rng, train: bool):
    del frozen
    logits = model.apply({'params': params}, batch[self.input_key], train=train, rngs={'dropout': rng})
    logits = logits.astype(jnp.float32)
    targets = self._targets(batch, logits.shape[-1])
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = (logits.argmax(-1) == targets.argmax(-1)).sum()
    return losses.sum(), {'weight': jnp.float32(losses.shape[0]), 'correct': correct.astype(jnp.float32)}

  def train_summary(self, sums):
    return {'train/accuracy': sums['correct'] / sums['weight']}

  def eval_sums(self, model, params, frozen, batch):
    del frozen
    logits = model.apply({'params': params}, batch[self.input_key], train=False).astype(jnp.float32)
    labels = batch['labels'].argmax(-1) if 'labels' in batch else batch['label']
    mask = batch['mask'].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'loss': (losses * mask).sum(), 'correct': ((logits.argmax(-1) == labels) * mask).sum(),
            'correct5': ((label_rank(logits, labels) < 5) * mask).sum(), 'count': mask.sum()}

  def eval_summary(self, sums: Mapping[str, float]) -> dict[str, float]:
    return {'loss': sums['loss'] / sums['count'], 'accuracy': sums['correct'] / sums['count'],
            'top5': sums['correct5'] / sums['count'], 'examples': sums['count']}

  def train_flops_per_example(self, forward_flops: float, trainable_fraction: float = 1.0) -> float:
    return backprop_flops(forward_flops, trainable_fraction)

  def example_shape(self, image_size: int, channels: int, seq_len: int) -> tuple[int, ...]:
    del seq_len
    return (image_size, image_size, channels)

  def synthetic_batch(self, config, batch_size: int, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {self.input_key: rng.standard_normal((batch_size, *input_shape), dtype=np.float32),
            'label': rng.integers(0, config.model.num_classes, batch_size).astype(np.int32)}


class LanguageModel:
  """Next-token cross-entropy over rows of `tokens` with `segment_ids` and `positions`, weighted per token.

  The data gives `targets` (the token each position predicts) and `loss_mask`, the per-token loss weight: the
  packed-text pipeline sets it to 0 where a prediction would cross a document boundary or touch padding, a
  chat pipeline to 0 on prompt tokens. The loss is the weighted mean over tokens (token-weighted): supervised
  finetuning on chat data (data format 'chat') is this objective, its loss and eval loss and perplexity on the
  assistant's replies only. The model is called as model.apply(variables, tokens, segment_ids=, positions=,
  train=), train=True in training only (Mistral's NEFTune noise keys on it).
  """
  frozen_needs: tuple[str, ...] = ()
  unit = 'tokens'
  eval_metrics = ('loss', 'perplexity', 'accuracy', 'tokens')

  def example_input(self, batch):
    return batch['tokens'][:1]

  def _token_losses(self, model, params, batch, rng, train: bool):
    logits = model.apply({'params': params}, batch['tokens'], segment_ids=batch['segment_ids'],
                         positions=batch['positions'], train=train,
                         **({'rngs': {'dropout': rng}} if rng is not None else {}))
    logits = logits.astype(jnp.float32)
    targets = batch['targets']
    weights = batch['loss_mask'].astype(jnp.float32)
    if 'mask' in batch:  # Eval padding rows.
      weights = weights * batch['mask'][:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = logits.argmax(-1) == targets
    return losses, correct, weights

  def loss(self, model, params, frozen, batch, rng, train: bool):
    del frozen
    losses, correct, weights = self._token_losses(model, params, batch, rng, train)
    return (losses * weights).sum(), {'weight': weights.sum(), 'correct': (correct * weights).sum()}

  def train_summary(self, sums):
    count = jnp.maximum(sums['weight'], 1.0)
    return {'train/accuracy': sums['correct'] / count, 'train/tokens': sums['weight']}

  def eval_sums(self, model, params, frozen, batch):
    del frozen
    losses, correct, weights = self._token_losses(model, params, batch, None, train=False)
    real = batch['segment_ids'] != 0
    if 'mask' in batch:
      real = real & batch['mask'][:, None]
    # 'count' is every real token seen (the loop checks it against the split), 'predicted' the scored ones.
    return {'loss': (losses * weights).sum(), 'correct': (correct * weights).sum(), 'predicted': weights.sum(),
            'count': real.sum().astype(jnp.float32)}

  def eval_summary(self, sums: Mapping[str, float]) -> dict[str, float]:
    loss = sums['loss'] / max(sums['predicted'], 1.0)
    return {'loss': loss, 'perplexity': float(np.exp(loss)),
            'accuracy': sums['correct'] / max(sums['predicted'], 1.0), 'tokens': sums['predicted']}

  def train_flops_per_example(self, forward_flops: float, trainable_fraction: float = 1.0) -> float:
    return backprop_flops(forward_flops, trainable_fraction)

  def example_shape(self, image_size: int, channels: int, seq_len: int) -> tuple[int, ...]:
    del image_size, channels
    return (seq_len,)

  def synthetic_batch(self, config, batch_size: int, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Random tokens, one document filling each row (the packed-text pipeline's keys)."""
    (seq_len,) = input_shape
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch_size, seq_len)).astype(np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.ones_like(tokens)
    loss_mask[:, -1] = 0
    return {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'targets': targets, 'loss_mask': loss_mask,
            'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()}


PAIR_KEYS = ('tokens', 'targets', 'loss_mask', 'segment_ids', 'positions')


class Preference:
  """DPO and its variants (train/dpo.py) on pairs of responses to one prompt, a pair per example.

  The batch holds each pair's two rows side by side, [B, 2, L] for every key of a language-model row ('tokens',
  'targets', 'loss_mask' on the response's tokens only, 'segment_ids', 'positions'), chosen at index 0: a batch
  never separates a pair. Both rows go through the model as one batch of 2B rows. The reference's sequence
  log-probabilities (no gradient, evaluation mode) come from `reference`:
    'frozen'        the frozen tree 'reference' (config.frozen.reference: 'init' is the run's starting
                    parameters, the SFT model), a second copy of the model
    'adapters_off'  the policy's own parameters with those `reference_zeroed` names (a regex; LoRA's lora_b by
                    default) set to zero: the adapted model with its adapters off, no second copy
    'precomputed'   the batch's 'ref_logps' [B, 2], computed once before training
  Train and eval metrics: TRL's rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
  logps/chosen, logps/rejected (means over pairs).
  """
  unit = 'examples'
  eval_metrics = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
                  'logps/chosen', 'logps/rejected', 'pairs')
  REFERENCES = ('frozen', 'adapters_off', 'precomputed')

  def __init__(self, loss: str = 'sigmoid', beta: float = 0.1, label_smoothing: float = 0.0,
               reference: str = 'frozen', reference_zeroed: str = r'(.*/)?lora_b'):
    dpo.check(loss, beta, label_smoothing)
    if reference not in self.REFERENCES:
      raise ValueError(f'task.reference={reference!r} is unknown; choose one of {list(self.REFERENCES)}.')
    self.loss_name, self.beta, self.label_smoothing = loss, float(beta), float(label_smoothing)
    self.reference = reference
    self.zeroed = re.compile(reference_zeroed)
    self.frozen_needs = ('reference',) if reference == 'frozen' else ()

  def example_input(self, batch):
    return batch['tokens'][:1, 0]

  def _logps(self, model, params, batch, rng, train: bool):
    """(sequence log-probabilities [B, 2], scored tokens [B, 2]) of both responses of every pair."""
    b, _, length = batch['tokens'].shape
    rows = {k: batch[k].reshape(2 * b, length) for k in PAIR_KEYS}
    logits = model.apply({'params': params}, rows['tokens'], segment_ids=rows['segment_ids'],
                         positions=rows['positions'], train=train,
                         **({'rngs': {'dropout': rng}} if rng is not None else {}))
    token_logps = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), rows['targets'])
    weights = rows['loss_mask'].astype(jnp.float32)
    return (token_logps * weights).sum(-1).reshape(b, 2), weights.sum(-1).reshape(b, 2)

  def sequence_logps(self, model, params, batch):
    """Both answers' summed log-probabilities [B, 2] in evaluation mode: the reference's part (train.reference_logps
    precomputes it with this)."""
    return self._logps(model, params, batch, None, train=False)[0]

  def _reference_logps(self, model, params, frozen, batch):
    if self.reference == 'precomputed':
      return batch['ref_logps'].astype(jnp.float32)
    if self.reference == 'frozen':
      params = frozen['reference']
    else:
      flat = traverse_util.flatten_dict(params, sep='/')
      zeroed = {k for k in flat if self.zeroed.fullmatch(k)}
      if not zeroed:
        raise ValueError(f'task.reference_zeroed={self.zeroed.pattern!r} matches no parameter, so the reference '
                         f'would be the policy; names look like {next(iter(flat))!r}.')
      params = traverse_util.unflatten_dict({k: jnp.zeros_like(v) if k in zeroed else v for k, v in flat.items()},
                                            sep='/')
    return jax.lax.stop_gradient(self.sequence_logps(model, params, batch))

  def _pairs(self, model, params, frozen, batch, rng, train: bool):
    policy, tokens = self._logps(model, params, batch, rng, train)
    reference = self._reference_logps(model, params, frozen, batch)
    losses = dpo.pair_losses(self.loss_name, self.beta, self.label_smoothing, policy, reference, tokens)
    weights = batch['mask'].astype(jnp.float32) if 'mask' in batch else jnp.ones(losses.shape, jnp.float32)
    return (losses * weights).sum(), dpo.pair_sums(self.beta, policy, reference, weights), weights.sum()

  def loss(self, model, params, frozen, batch, rng, train: bool):
    loss_sum, sums, count = self._pairs(model, params, frozen, batch, rng, train)
    return loss_sum, {**sums, 'weight': count}

  def train_summary(self, sums):
    count = jnp.maximum(sums['weight'], 1.0)
    return {f'train/{k}': v for k, v in dpo.summary(sums, count).items()}

  def eval_sums(self, model, params, frozen, batch):
    loss_sum, sums, count = self._pairs(model, params, frozen, batch, None, train=False)
    return {**sums, 'loss': loss_sum, 'count': count}

  def eval_summary(self, sums: Mapping[str, float]) -> dict[str, float]:
    count = max(float(sums['count']), 1.0)
    return {'loss': sums['loss'] / count, **{k: float(v) for k, v in dpo.summary(sums, count).items()},
            'pairs': sums['count']}

  def train_flops_per_example(self, forward_flops: float, trainable_fraction: float = 1.0) -> float:
    """A pair: both responses forward and backward, and both through the reference unless precomputed."""
    reference = 0.0 if self.reference == 'precomputed' else 2.0 * forward_flops
    return 2.0 * backprop_flops(forward_flops, trainable_fraction) + reference

  def example_shape(self, image_size: int, channels: int, seq_len: int) -> tuple[int, ...]:
    del image_size, channels
    return (seq_len,)

  def synthetic_batch(self, config, batch_size: int, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Random pairs filling each row: a prompt of half the row, then the response (scored)."""
    (seq_len,) = input_shape
    rows = LanguageModel().synthetic_batch(config, 2 * batch_size, input_shape)
    rows['loss_mask'][:, :seq_len // 2] = 0
    out = {k: v.reshape(batch_size, 2, seq_len) for k, v in rows.items()}
    if self.reference == 'precomputed':
      out['ref_logps'] = np.full((batch_size, 2), -float(seq_len), np.float32)
    return out


OBJECTIVES = {'classification': Classification, 'language_model': LanguageModel, 'preference': Preference}


def make_objective(task_config: Mapping[str, Any]):
  """The objective `task_config.name` names, built with the config's other fields."""
  return build.from_registry('task', OBJECTIVES, task_config)


def mean_loss(objective, model, params, frozen, batch, rng, train: bool):
  """(loss, metrics) of one batch as the step reports them: the summed loss over the summed weight."""
  loss_sum, sums = objective.loss(model, params, frozen, batch, rng, train)
  return loss_sum / sums['weight'], objective.train_summary(sums)
