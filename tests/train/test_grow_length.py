"""GrowLength through the loop: rows that lengthen by stages, one compilation per length, an exact resume inside
a later stage, and FLOP and token counts that follow the length."""
from train import metrics as metrics_lib

STAGES = ((0, 16), (15, 32))  # 15 steps of 16 tokens, then rows of 32


def test_stages_resume_bitwise_after_kill_9_and_count_every_token(tiny_mistral_command, tmp_path, kill_9_and_resume):
  """Killed with kill -9 after checkpoint 20 (inside the second stage) and rerun, the run ends as the
  uninterrupted one; both count 15 x 8 x 16 + 25 x 8 x 32 tokens, on a mesh that splits each row in two."""
  command = tiny_mistral_command({'data.grow_length': repr(STAGES).replace(' ', ''), 'mesh.data': 1,
                                  'mesh.sequence': 2})
  straight, killed, out = kill_9_and_resume(command, tmp_path, kill_at=20, last_step=40, devices=2)
  assert out.count('train step compiled in') == 1  # rows of 16
  assert out.count('train step for the new input shape (32,) compiled in') == 1
  strip = lambda w: [{k: v for k, v in r.items() if k.startswith(('train/', 'eval/', 'step', 'compute/train_'))}
                     for r in metrics_lib.read_metrics(str(w))]
  assert strip(killed) == strip(straight)
  last = metrics_lib.read_metrics(str(straight))[-1]
  assert last['compute/train_tokens'] == 15 * 8 * 16 + 25 * 8 * 32
  by_step = {r['step']: r for r in metrics_lib.read_metrics(str(straight)) if 'compute/train_flops' in r}
  # A step of 32-token rows costs twice one of 16 (the window of 8 is shorter than both rows, so a token's
  # attention costs the same in both).
  per_step = lambda a, b: (by_step[b]['compute/train_flops'] - by_step[a]['compute/train_flops']) / (b - a)
  assert per_step(20, 25) == 2 * per_step(5, 10) > 0
