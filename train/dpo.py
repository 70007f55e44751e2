"""Direct preference optimisation's arithmetic (Rafailov et al. 2023), as Zephyr's dDPO uses it: pure functions of
sequence log-probabilities, shared by the `preference` objective (train/objectives.py) and its tests.

A pair is a prompt with a chosen and a rejected response. Each response's log-probability is the SUM of its own
tokens' log-probabilities (its prompt and padding weigh 0, each response masked on its own, neither cut to the
other's length). With pi the policy's and ref the reference's, the implicit rewards are
beta * (pi - ref) and their difference z = beta * ((pi_c - ref_c) - (pi_r - ref_r)). Losses per pair:

  sigmoid   -(1 - eps) log sigmoid(z) - eps log sigmoid(-z): DPO at eps = 0 (`label_smoothing`); with eps > 0
            conservative DPO (Mitchell 2023), which assumes the labels flipped with probability eps
  robust    (-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps): robust DPO (Chowdhury et al. 2024),
            an unbiased estimate of the clean loss under flips with probability eps < 0.5 (TRL's 'robust')
  ipo       (h - 1 / (2 beta))^2 with h the difference of the per-token averages of (pi - ref) (Azar et al.
            2023, in TRL's length-normalised form)

beta multiplies once, inside z (and 1 / (2 beta) in IPO).
"""
import jax
import jax.numpy as jnp

LOSSES = ('sigmoid', 'robust', 'ipo')


def check(loss: str, beta: float, label_smoothing: float) -> None:
  if loss not in LOSSES:
    raise ValueError(f'task.loss={loss!r} is unknown; choose one of {list(LOSSES)}.')
  if not beta > 0:
    raise ValueError(f'task.beta={beta!r} must be > 0 (Zephyr: 0.1, the later handbook recipe 0.01).')
  if not 0 <= label_smoothing < 0.5:
    raise ValueError(f'task.label_smoothing={label_smoothing!r} must be in [0, 0.5).')
  if loss == 'ipo' and label_smoothing:
    raise ValueError('task.label_smoothing applies to the sigmoid and robust losses, not ipo; set it to 0.')


def pair_losses(loss: str, beta: float, label_smoothing: float, policy, reference, tokens):
  """Per-pair losses [B] from sequence log-probabilities [B, 2] (chosen, rejected) of the policy and the
  reference, and each response's scored token count [B, 2] (for IPO's averages)."""
  ratios = policy - reference  # log pi / ref of each response
  if loss == 'ipo':
    averages = ratios / jnp.maximum(tokens, 1.0)
    return (averages[:, 0] - averages[:, 1] - 1.0 / (2.0 * beta)) ** 2
  z = beta * (ratios[:, 0] - ratios[:, 1])
  eps = label_smoothing
  if loss == 'sigmoid':
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def pair_sums(beta: float, policy, reference, weights) -> dict[str, jax.Array]:
  """Additive sums of the logged metrics over the pairs weighted by `weights` [B] (1 real, 0 padding): implicit
  rewards, how often the chosen one's is strictly higher, their margins, and the policy's log-probabilities."""
  rewards = beta * (policy - reference)
  return {'rewards_chosen': (rewards[:, 0] * weights).sum(), 'rewards_rejected': (rewards[:, 1] * weights).sum(),
          'rewards_correct': ((rewards[:, 0] > rewards[:, 1]) * weights).sum(),
          'rewards_margin': ((rewards[:, 0] - rewards[:, 1]) * weights).sum(),
          'logps_chosen': (policy[:, 0] * weights).sum(), 'logps_rejected': (policy[:, 1] * weights).sum()}


def summary(sums, count) -> dict[str, jax.Array]:
  """The metrics (TRL's names) of `pair_sums` added up over `count` pairs."""
  return {'rewards/chosen': sums['rewards_chosen'] / count, 'rewards/rejected': sums['rewards_rejected'] / count,
          'rewards/accuracies': sums['rewards_correct'] / count, 'rewards/margins': sums['rewards_margin'] / count,
          'logps/chosen': sums['logps_chosen'] / count, 'logps/rejected': sums['logps_rejected'] / count}
