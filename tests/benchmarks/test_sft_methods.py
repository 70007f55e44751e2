"""benchmarks/sft_methods.py end to end on a shrunk model and a small chat corpus: it trains, answers, and prints."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sft_methods_runs_and_prints_its_table(tmp_path):
  with open(tmp_path / 'chats.jsonl', 'w') as f:
    for a in range(40):
      f.write(json.dumps({'messages': [{'role': 'user', 'content': f'What is {a} plus 2?'},
                                       {'role': 'assistant', 'content': f'{a} plus 2 is {a + 2}.'}]}) + '\n')
  (tmp_path / 'prompts.jsonl').write_text(json.dumps({'prompt': 'What is 3 plus 2?'}) + '\n')
  shrink = ['--config.model.embed_dim=32', '--config.model.num_layers=1', '--config.model.num_heads=2',
            '--config.model.num_kv_heads=1', '--config.model.head_dim=16', '--config.model.mlp_dim=64',
            f'--config.data.files={tmp_path}/chats.jsonl', f'--config.data.data_dir={tmp_path}/tfds',
            '--config.data.seq_len=64', '--config.batch_size=4', '--config.eval_batch_size=4',
            '--config.log_every_steps=2', '--config.eval_every_steps=4', '--config.checkpoint_every_steps=4']
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.sft_methods', f'--workdir={tmp_path}/runs', '--methods=qlora',
       '--steps=4', '--base_steps=0', f'--prompts_file={tmp_path}/prompts.jsonl', '--max_new_tokens=4',
       *(f'--flags={f}' for f in shrink)],
      cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  (row,) = [l for l in out.stdout.splitlines() if l.startswith('| qlora |')]
  assert 'MiB' in row and '->' in row, row
  assert 'bytes per parameter' in out.stdout and '> What is 3 plus 2?' in out.stdout
  results = json.loads((tmp_path / 'runs' / 'results.json').read_text())['results']['qlora']
  # QLoRA r=64 trains only the factors: far fewer parameters than the model holds.
  assert 0 < results['trainable_params'] < results['params'] and results['eval_step'] == 4
