"""Supervised finetuning through `python -m train`: configs/mistral_sft.py shrunk, on a small chat JSONL corpus, with
LoRA and NEFTune; killed with kill -9 and rerun, it ends bit for bit like an uninterrupted run, and its checkpoints
hold only the adapter's factors and their optimizer state."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import mistral_sft
from data import chat_data, pipeline
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SFT = '''
"""configs/mistral_sft.py shrunk for tests/train/test_sft.py."""
from configs import mistral_sft


def get_config(arg=None):
  c = mistral_sft.get_config(arg)
  c.model.update(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, sliding_window=8,
                 block_size=8)
  c.data.update(files={files!r}, data_dir={data_dir!r}, seq_len=64, num_threads=1, prefetch=1, packing_bins=4)
  c.batch_size = c.eval_batch_size = 4
  c.total_steps, c.checkpoint_every_steps, c.log_every_steps, c.eval_every_steps = 40, 10, 5, 20
  c.schedule.warmup_steps = 2
  c.eval_at_start = False
  return c
'''


def _corpus(root):
  root.mkdir()
  rng = np.random.default_rng(0)
  with open(root / 'chats.jsonl', 'w') as f:
    for i in range(120):
      a, b = (int(x) for x in rng.integers(0, 50, 2))
      f.write(json.dumps({'messages': [{'role': 'user', 'content': f'What is {a} plus {b}?'},
                                       {'role': 'assistant', 'content': f'{a} plus {b} is {a + b}.'}]}) + '\n')
  return str(root / '*.jsonl')


def _checkpoint(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


def test_lora_neftune_sft_resumes_bitwise_after_kill_9_and_saves_only_the_adapter(tmp_path, kill_9_and_resume):
  files, data_dir = _corpus(tmp_path / 'corpus'), str(tmp_path / 'tfds')
  pipeline.get_source('chat', 'train', data_dir, builder_config=chat_data.files_config(files))  # Prepared once.
  config_file = tmp_path / 'tiny_sft.py'
  config_file.write_text(textwrap.dedent(TINY_SFT.format(files=files, data_dir=data_dir)))
  command = lambda workdir: [sys.executable, '-m', 'train', f'--config={config_file}:neftune=5,lora=4',
                             f'--workdir={workdir}']
  straight, killed, out = kill_9_and_resume(command, tmp_path, kill_at=10, last_step=40)
  metrics = lambda w: [{k: v for k, v in r.items() if k.startswith(('train/', 'eval/', 'step'))}
                       for r in metrics_lib.read_metrics(str(w))]
  assert metrics(killed) == metrics(straight)
  a, b = _checkpoint(str(killed), 40), _checkpoint(str(straight), 40)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Only the factors are checkpointed (the frozen base is rebuilt from the seed), with their optimizer state.
  names = traverse_util.flatten_dict(a['trainable'], sep='/')
  assert names and all(n.rsplit('/', 1)[-1] in ('lora_a', 'lora_b') for n in names)
  assert len(names) == 2 * 7 * 2
  (line,) = [l for l in out.splitlines() if l.startswith('start:')]
  assert f'({sum(v.size for v in names.values()):,} trainable)' in line, line
  assert 'adapter: LoRA rank 4, scale 2 on 14 kernels' in out
  # The eval loss is over the replies only: far fewer tokens than the conversations hold.
  last = metrics_lib.read_metrics(str(straight))[-1]
  assert 0 < last['eval/tokens'] and np.isfinite(last['eval/perplexity'])


def test_sft_config_arguments():
  c = mistral_sft.get_config('neftune=5,qlora=64')
  assert c.model.embed_noise_alpha == 5.0 and c.adapter.name == 'qlora' and c.adapter.rank == 64
  assert c.data.format == 'chat' and c.data.template == 'zephyr' and c.task.name == 'language_model'
  assert mistral_sft.get_config('lora=16').adapter.alpha == 32.0
  assert mistral_sft.get_config().adapter.name == 'none'


@pytest.fixture(scope='module')
def sft_config_file(tmp_path_factory):
  """The shrunk SFT config on a small corpus, its chat data prepared once: (config file, corpus directory)."""
  root = tmp_path_factory.mktemp('sft')
  files, data_dir = _corpus(root / 'corpus'), str(root / 'tfds')
  pipeline.get_source('chat', 'train', data_dir, builder_config=chat_data.files_config(files))
  config_file = root / 'tiny_sft.py'
  config_file.write_text(textwrap.dedent(TINY_SFT.format(files=files, data_dir=data_dir)))
  return config_file, root / 'corpus'


BAD_INPUTS = {
    # A line whose message has no role: named by file and line, fatal by default (data.on_bad_line).
    'jsonl': ('', ['--config.data.files={bad}'], r'error: .*bad\.jsonl:2: message 0 has no "role"'),
    'lora_regex': ('lora=4', ['--config.adapter.params=.*/nothing/kernel'],
                   r"error: adapter\.params='\.\*/nothing/kernel' matches no projection kernel"),
    # Width 36 and heads of 6: the key projection's 36 x 12 values do not divide into blocks of 64.
    'qlora_blocks': ('qlora=4', ['--config.model.embed_dim=36', '--config.model.head_dim=6'],
                     r"error: QLoRA cannot quantise '.*': its .* values \(per layer\) do not divide into blocks of 64"),
    'template': ('', ['--config.data.template=llama'], r"error: .*chat template 'llama' does not exist"),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_ends_the_command_with_one_error_line(case, sft_config_file, tmp_path, one_device_env):
  config_file, corpus = sft_config_file
  arg, overrides, expected = BAD_INPUTS[case]
  bad = tmp_path / 'bad'
  bad.mkdir()
  good = json.dumps({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]})
  (bad / 'bad.jsonl').write_text(good + '\n' + json.dumps({'messages': [{'content': 'no role'}]}) + '\n')
  overrides = [o.format(bad=bad / '*.jsonl') for o in overrides]
  run = subprocess.run([sys.executable, '-m', 'train', f'--config={config_file}' + (f':{arg}' if arg else ''),
                        f'--workdir={tmp_path / "w"}', *overrides], cwd=REPO, env=one_device_env(),
                       capture_output=True, text=True, timeout=300)
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2 and re.match(expected, lines[-1]), run.stderr[-2000:]
  assert not any(l.startswith('Traceback') for l in lines), run.stderr[-2000:]


def test_pod_qlora_config_runs_locally_on_8_devices(sft_config_file, tmp_path):
  """configs/mistral_qlora.py:runlocal=True (configs/zephyr_dsft.py's data, model and mesh with the QLoRA paper's
  adapter): 2 scanned, rematerialised bf16 layers over fsdp=2 x tensor=4, a few steps on the small corpus."""
  from configs import mistral_qlora
  from train import loop
  config_file, corpus = sft_config_file
  assert jax.device_count() == 8
  config = mistral_qlora.get_config('runlocal=True')
  assert (config.data.format, config.data.template, config.adapter.name) == ('chat', 'zephyr', 'qlora')
  assert (config.model.scan, config.model.dtype, config.mesh.fsdp, config.mesh.tensor) == (True, 'bfloat16', -1, 4)
  config.data.update(files=str(corpus / '*.jsonl'), data_dir=str(config_file.parent / 'tfds'))
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps, config.log_every_steps = 4, 0, 4, 2
  result = loop.train(config, str(tmp_path / 'run'))  # No evaluation: its compilation would double the cost.
  losses = [r['train/loss'] for r in metrics_lib.read_metrics(str(tmp_path / 'run'))]
  assert result['step'] == 4 and len(losses) == 2 and np.isfinite(losses).all()
  base = traverse_util.flatten_dict(result['frozen']['base'], sep='/')
  codes = base['layers/mlp/gate/kernel_nf4']
  assert codes.dtype == np.uint8 and codes.shape == (2, 64, 128 // 2)  # 2 layers, in layout: two codes a byte
  assert 'layers/mlp/gate/kernel' not in base  # no full-precision copy of an adapted kernel
  trainable = traverse_util.flatten_dict(result['state']['trainable'], sep='/')
  assert trainable['layers/mlp/gate/lora_a'].shape == (2, 64, config.adapter.rank)
