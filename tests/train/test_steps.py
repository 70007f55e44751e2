"""The train step: micro-batches add up to the full batch; the compiled step needs less memory with them; runs of
one program in a process share it."""
import flax.linen as nn
import jax
import numpy as np

from train import adapters, loop, objectives, sharding, steps
from train import metrics as metrics_lib

SGD = {'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'schedule.base_learning_rate': 0.1}


def _relative(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def test_microbatches_equal_the_full_batch(digits_dir, tmp_path, tiny_config):
  runs = {}
  for m in (1, 4):  # 2 devices x 8 examples each, split 4 ways: 2 examples per device per micro-batch.
    config = tiny_config(digits_dir, total_steps=10, microbatches=m, **{'mesh.data': 2}, **SGD)
    out = loop.train(config, str(tmp_path / str(m)), devices=jax.devices()[:2])
    runs[m] = (jax.device_get(out['state']['trainable']), metrics_lib.read_metrics(str(tmp_path / str(m))))
  (params_1, records_1), (params_4, records_4) = runs[1], runs[4]
  for key in ('train/loss', 'train/accuracy', 'train/grad_norm'):
    for r1, r4 in zip(records_1, records_4, strict=True):
      assert _relative(r4[key], r1[key]) <= 1e-6, (key, r1['step'], r1[key], r4[key])
  # Relative to the parameters' norm: the attention key bias has an exactly-zero gradient and holds only
  # rounding noise near 0, whose own relative change means nothing.
  flat_1, flat_4 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (params_1, params_4))
  assert _relative(flat_4, flat_1) <= 1e-6
  scale = np.linalg.norm(flat_1)
  errors = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b)) / scale, params_4, params_1)
  assert max(jax.tree.leaves(errors)) <= 1e-6, errors


def test_microbatches_lower_the_step_temporaries(tiny_config):
  """XLA's memory analysis of the compiled step: activations of a quarter of the batch at a time."""
  temporaries = {}
  for m in (1, 4):
    config = tiny_config(None, microbatches=m)
    config.batch_size = 64
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding.logical_rules(config.sharding_rules)
    objective = objectives.make_objective(config.task)
    batch = objective.synthetic_batch(config, 64, (8, 8, 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      fns = steps.build(config, mesh, rules, loop.build_model(config), objective, adapters.make_adapter(None),
                        objective.example_input(batch))
      state, _ = fns.init(fns.init_key)
      compiled = fns.train.lower(state, {}, sharding.global_batch(batch, fns.batch_sharding),
                                 fns.learning_rates[0]).compile()
    temporaries[m] = compiled.memory_analysis().temp_size_in_bytes
  assert temporaries[4] < 0.6 * temporaries[1], temporaries


def test_runs_of_one_program_share_it_and_train_as_if_alone(digits_dir, tmp_path, tiny_config):
  """A sweep's runs in one process reuse the compiled step of an earlier run of the same program (another
  learning rate and length); each trains exactly as it does built afresh, and a run whose optimizer differs gets
  its own program."""
  first = tiny_config(digits_dir, total_steps=4, **{'schedule.base_learning_rate': 1e-3})
  second = tiny_config(digits_dir, total_steps=6, **{'schedule.base_learning_rate': 3e-3})
  decayed = tiny_config(digits_dir, total_steps=6, **{'schedule.base_learning_rate': 3e-3,
                                                        'optimizer.weight_decay': 0.5})
  steps._PROGRAMS.clear()
  loop.train(first, str(tmp_path / 'first'))
  shared = {name: loop.train(c, str(tmp_path / name)) for name, c in (('second', second), ('decayed', decayed))}
  assert len(steps._PROGRAMS) == 2  # first and second share one; decayed is another.
  for name, config in (('second', second), ('decayed', decayed)):
    steps._PROGRAMS.clear()
    alone = loop.train(config, str(tmp_path / f'{name}_alone'))
    for a, b in zip(jax.tree.leaves(jax.device_get(shared[name]['state'])),
                    jax.tree.leaves(jax.device_get(alone['state'])), strict=True):
      np.testing.assert_array_equal(a, b)
    logged = [metrics_lib.read_metrics(str(tmp_path / d)) for d in (name, f'{name}_alone')]
    assert [r['train/loss'] for r in logged[0]] == [r['train/loss'] for r in logged[1]]
    assert [r['train/learning_rate'] for r in logged[0]] == [r['train/learning_rate'] for r in logged[1]]
