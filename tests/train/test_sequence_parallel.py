"""The loop with a 'sequence' mesh axis: rows split over devices train as on one device, and resume bitwise."""
import jax
import numpy as np

from train import loop
from train import metrics as metrics_lib

TINY = dict(total_steps=6, log_every_steps=1, eval_every_steps=6, checkpoint_every_steps=3)


def _run(config, workdir, devices, **mesh):
  with config.unlocked():
    config.update(TINY)
    config.schedule.warmup_steps = 2
    config.mesh.update(mesh)
  loop.train(config, str(workdir), devices=jax.devices()[:devices])
  return metrics_lib.read_metrics(str(workdir))


def test_a_split_row_trains_as_on_one_device(tiny_mistral_config, tmp_path):
  """Rows of 32 tokens over sequence=4 (shards of 8, window 8: a halo of 7 from the previous shard), then over
  data=2 x sequence=2: the losses, gradient norms and the eval loss equal the one-device run's (the loss is
  token-weighted over every shard)."""
  one = _run(tiny_mistral_config.copy_and_resolve_references(), tmp_path / 'one', 1, data=1)
  for name, mesh in {'seq4': dict(data=1, sequence=4), 'data2_seq2': dict(data=2, sequence=2)}.items():
    split = _run(tiny_mistral_config.copy_and_resolve_references(), tmp_path / name, 4, **mesh)
    assert [r['step'] for r in split] == [r['step'] for r in one]
    for a, b in zip(split, one):
      for key in ('train/loss', 'train/grad_norm', 'eval/loss'):
        if key in b:
          np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f'{name} {key} at step {b["step"]}')


def test_sequence_parallel_run_resumes_bitwise_after_kill_9(tiny_mistral_command, tmp_path, kill_9_and_resume):
  command = tiny_mistral_command({'mesh.data': 2, 'mesh.sequence': 2})
  straight, killed, out = kill_9_and_resume(command, tmp_path, kill_at=10, last_step=40, devices=4)
  assert 'mesh data=2 fsdp=1 sequence=2 tensor=1' in out
  strip = lambda w: [{k: v for k, v in r.items() if k.startswith(('train/', 'eval/', 'step'))}
                     for r in metrics_lib.read_metrics(str(w))]
  assert strip(killed) == strip(straight)
