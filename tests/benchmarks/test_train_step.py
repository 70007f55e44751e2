"""The benchmark script runs end to end and prints its figures (a smoke test, no timing asserted)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_prints_jax_and_reference_figures():
  cmd = [sys.executable, '-m', 'benchmarks.train_step', '--config=configs/vit_digits.py', '--batch_size=4',
         '--image_size=8', '--channels=1', '--steps=2', '--reference=hf_vit']
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu')
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  jax_line = re.search(r'jax   vit: ([\d.]+) ms/step \| ([\d.]+) examples/s \| ([\d.e+-]+) GFLOP/step', out.stdout)
  assert jax_line and float(jax_line.group(3)) > 0, out.stdout
  # The analytic forward FLOPs of this 4-block, width-64 ViT on 16 tokens, x3 for the backward pass,
  # bound XLA's count from below (XLA adds the optimizer, norms and softmax on top).
  tokens, width, mlp, depth, batch = 16, 64, 128, 4, 4
  forward = batch * depth * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)
  assert 3 * forward / 1e9 <= float(jax_line.group(3)) <= 2 * 3 * forward / 1e9
  assert re.search(r'torch hf_vit: [\d.]+ ms/step', out.stdout), out.stdout


def test_benchmark_times_language_models_beside_hf_mistral():
  cmd = [sys.executable, '-m', 'benchmarks.train_step', '--config=configs/mistral_tiny.py', '--batch_size=2',
         '--seq_len=32', '--steps=2', '--reference=hf_mistral', '--config.model.num_layers=1',
         '--config.model.embed_dim=32', '--config.model.head_dim=8', '--config.model.mlp_dim=64',
         '--config.model.sliding_window=8', '--config.model.block_size=8']
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu')
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'jax   mistral: [\d.]+ ms/step \| [\d.]+ tokens/s \| [\d.e+-]+ GFLOP/step', out.stdout), out.stdout
  assert re.search(r'torch hf_mistral: [\d.]+ ms/step \| [\d.]+ tokens/s', out.stdout), out.stdout


def test_generate_benchmark_times_decoding_beside_hf_generate():
  cmd = [sys.executable, '-m', 'benchmarks.generate', '--config=configs/mistral_tiny.py', '--batch_sizes=2',
         '--prompt_len=12', '--new_tokens=6', '--repeats=1', '--reference', '--pairs=2',
         '--config.model.num_layers=1', '--config.model.embed_dim=32', '--config.model.head_dim=8',
         '--config.model.mlp_dim=64', '--config.model.sliding_window=8']
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu')
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for b in (2,):  # two (jax, torch) pairs, each torch figure from its own fresh process
    assert len(re.findall(rf'jax   batch {b}: [\d.]+ ms/call \| [\d.]+ new tokens/s', out.stdout)) == 2, out.stdout
    assert len(re.findall(rf'torch batch {b}: [\d.]+ ms/call .* jax/torch speed [\d.]+x', out.stdout)) == 2
    assert re.search(rf'batch {b}: jax/torch speed over 2 pairs: median [\d.]+x', out.stdout), out.stdout
