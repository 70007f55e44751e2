"""The dry run's memory accounting (train/memory.py): per-device bytes equal to what a run really allocates, the
step's temporaries from the compiler, and Mistral-7B's figures at the command line against its parameter count."""
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from configs import common
from train import adapters, loop, memory, metrics, objectives, sharding, steps
from train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qlora_on_8_devices(config):
  config.adapter = common.adapter('qlora', rank=4, alpha=8.0)
  config.mesh = common.mesh(data=1, fsdp=4, tensor=2)  # the tiny model's 2 K/V heads split in 2
  config.total_steps = 100
  return config


def test_dry_run_bytes_equal_a_real_runs_arrays(tiny_mistral_config):
  assert jax.device_count() == 8
  config = _qlora_on_8_devices(tiny_mistral_config)
  counted = memory.account(config)
  assert counted.mesh == {'data': 1, 'fsdp': 4, 'sequence': 1, 'tensor': 2} and counted.devices == 8

  # The same run's state and frozen base, allocated for real, and their bytes on the first device.
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  rules = sharding.logical_rules(config.sharding_rules)
  objective = objectives.make_objective(config.task)
  one = objective.synthetic_batch(config, 1, (config.data.seq_len,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps.build(config, mesh, rules, loop.build_model(config), objective,
                      adapters.make_adapter(config.adapter), objective.example_input(one))
    state, base = fns.init(fns.init_key)
  device = jax.devices()[0]
  assert counted.per_device['trainable'] == metrics.bytes_on_device(state['trainable'], device) > 0
  assert counted.per_device['optimizer'] == metrics.bytes_on_device(state['opt_state'], device) > 0
  assert counted.per_device['frozen'] == metrics.bytes_on_device({state_lib.BASE: base}, device) > 0
  # Token ids, targets, weights, segments and positions: 5 int32 values per token of the device's rows.
  assert counted.per_device['batch'] == 5 * 4 * config.data.seq_len * config.batch_size // 4
  largest = counted.largest[0]
  assert largest[1] == max(n for _, n, _ in counted.largest) and largest[0].startswith(('frozen/', 'optimizer/'))

  # A mesh that does not divide a parameter is named in one line (the run's own check, in train/sharding.py),
  # before anything compiles.
  config.mesh = common.mesh(data=1, fsdp=2, tensor=4)
  with pytest.raises(ValueError, match=r"^parameter layer_0/attn/key/kernel of shape \(32, 2, 8\) cannot be "
                     r"split as \('fsdp', 'tensor', None\) over the mesh data=1 fsdp=2 tensor=4; "
                     r"change config.mesh or config.sharding_rules.$"):
    memory.account(config)

  # The compiled step's temporaries hold at least the float32 logits of the device's rows (2 of 8, the vocabulary
  # split over tensor=2).
  assert counted.per_device['temporaries'] >= 2 * config.data.seq_len * (config.model.vocab_size // 2) * 4


def test_dry_run_of_mistral_7b_at_the_command_line(tmp_path):
  """Full dSFT of Mistral-7B on 8 devices (fsdp=2 x tensor=4): f32 parameters are 4 bytes, AdamW's two moments
  8 bytes per parameter, split 8 ways (a few small norms only 2 ways); nothing is allocated."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-m', 'train', '--config=configs/zephyr_dsft.py', '--dry_run',
                        '--hardware=tpu_v5e', '--config.microbatches=256'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  out = run.stdout
  assert 'mesh data=1 fsdp=2 tensor=4 | 7,241,732,096 parameters (7,241,732,096 trainable)' in out, out
  gib = {name: float(value) for name, value in re.findall(r'^  (\w+) +([\d.]+) GiB$', out, re.M)}
  params = 7_241_732_096
  assert gib['trainable'] == pytest.approx(4 * params / 8 / 2 ** 30, rel=0.01)
  assert gib['optimizer'] == pytest.approx(8 * params / 8 / 2 ** 30, rel=0.01)
  assert 'frozen' not in gib and gib['temporaries'] > gib['trainable']  # the gradients alone are as large
  assert re.search(r'of one tpu_v5e device \(16 GiB\): \d+%, (fits|does NOT fit)', out), out


def test_an_unknown_hardware_is_one_line_before_anything_compiles():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-m', 'train', '--config=configs/mistral_sft.py', '--dry_run',
                        '--hardware=tpu_v9'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
      "error: --hardware='tpu_v9' is unknown; choose one of ['h100', 'tpu_v4', 'tpu_v5e', 'tpu_v5p', 'tpu_v6e'].")
