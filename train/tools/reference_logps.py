r"""Precomputes a DPO run's reference log-probabilities in one pass, so the run holds no reference model.

  python -m train.reference_logps --config=configs/zephyr_cpu.py:stage=ddpo,reference=precomputed \
      --config.init_params=workdirs/zephyr_cpu/dsft --config.data.files=workdirs/zephyr_cpu/pairs.jsonl \
      --out=workdirs/zephyr_cpu/reference_logps.npz
  python -m train --config=... (the same) --config.data.ref_logps=workdirs/zephyr_cpu/reference_logps.npz

The reference is the run's starting model, config.init_params (a workdir or an imported model; its evaluated
parameters, an adapter's base merged back in). Every pair of the run's train and eval splits that fits is encoded
exactly as the run's data format encodes it (template, tokenizer, max_length, max_prompt_length) and both answers'
summed log-probabilities under the reference, in evaluation mode, are stored in OUT (an .npz: `keys`, each pair's
`data.formats.preference.pair_key`, and `logps` float32 [N, 2], chosen first), written atomically. The run with
task.reference='precomputed' and data.ref_logps=OUT reads them beside its batches (TRL's precompute_ref_log_probs).
"""
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from train import cli
from train.tools import loader

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line flags (defined only when run as a command)."""
  config_flags.DEFINE_config_file('config', None, 'The DPO run\'s config file, optionally with :ARGS; '
                                  '--config.key=value overrides as for python -m train.', lock_config=True)
  flags.DEFINE_string('out', None, 'The .npz to write.')
  flags.DEFINE_integer('batch_size', None, 'Pairs per forward pass (default: the config\'s eval_batch_size).')
  flags.mark_flags_as_required(['config', 'out'])


def compute(config, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(keys [N] str, logps float32 [N, 2]) of the train and eval splits' pairs under config.init_params."""
  from data import formats
  from data.formats import preference
  from train import objectives, steps
  if not config.get('init_params'):
    raise ValueError('config.init_params is unset: the reference is the run\'s starting model; set it to the SFT '
                     'workdir or imported model the DPO run starts from.')
  fmt = formats.get_format(config.data)
  if not hasattr(fmt, 'encoded_pairs'):
    raise ValueError(f'data.format={config.data.format!r} holds no preference pairs; use the preference format.')
  run = loader.load_run(config.init_params)
  objective = objectives.make_objective({'name': 'preference'})
  # Compiled as the train step is (same XLA options), so at step 0 the policy's log-probabilities equal these.
  logps_of = steps.jit_step(lambda params, batch: objective.sequence_logps(run.model, params, batch))
  size = batch_size or config.get('eval_batch_size') or 8
  keys, values = {}, []
  for split_key in ('train_split', 'eval_split'):
    pending = []
    for pair in [*fmt.encoded_pairs(config.data, split_key), None]:
      if pair is not None:
        key = preference.pair_key(pair)
        if key in keys:
          continue
        keys[key] = len(keys)
        pending.append(pair)
      if pending and (pair is None or len(pending) == size):
        n = len(pending)
        batch = {k: np.stack([p[k] for p in pending] + [pending[0][k]] * (size - n)) for k in objectives.PAIR_KEYS}
        values.append(np.asarray(logps_of(run.params, jax.tree.map(jnp.asarray, batch)))[:n])
        pending = []
  return np.asarray(list(keys)), np.concatenate(values).astype(np.float32)


def write(path: str, keys: np.ndarray, logps: np.ndarray) -> None:
  from etils import epath
  tmp = epath.Path(path + '.tmp')
  with tmp.open('wb') as f:
    np.savez(f, keys=keys, logps=logps)
  tmp.rename(path)


def main(argv):
  cli.no_arguments(argv)
  cli.quiet_logging()
  start = time.time()
  with cli.failing_on(ValueError, FileNotFoundError):
    keys, logps = compute(FLAGS.config, FLAGS.batch_size)
  write(FLAGS.out, keys, logps)
  print(f'reference log-probabilities of {len(keys)} pairs under {FLAGS.config.init_params} -> {FLAGS.out} '
        f'({time.time() - start:.0f} s; mean chosen {logps[:, 0].mean():.2f}, rejected {logps[:, 1].mean():.2f})',
        flush=True)


if __name__ == '__main__':
  cli.run(sys.modules[__name__])
