"""Compute accounting: analytic FLOPs against XLA's count, budgets in steps, and the loop's compute metrics."""
import json
import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import mistral_tiny, nfnet_digits, vit_digits
from data import pipeline
from models import mistral, nfnet, vit
from train import checkpoint as checkpoint_lib
from train import adapters, compute, loop, objectives, sharding, steps
from train import metrics as metrics_lib

# Mistral-7B v0.1 (see shared/reference/mistral.md).
MISTRAL_7B = dict(embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
                  sliding_window=4096, vocab_size=32000, norm_eps=1e-5, rope_theta=1e4)


def _images(batch_size, size=32, channels=3):
  rng = np.random.default_rng(0)
  return {'image': rng.standard_normal((batch_size, size, size, channels), dtype=np.float32),
          'label': rng.integers(0, 10, batch_size).astype(np.int32)}


def _tokens(batch_size, length, vocab_size):
  tokens = np.random.default_rng(0).integers(0, vocab_size, (batch_size, length)).astype(np.int32)
  targets, loss_mask = np.zeros_like(tokens), np.ones_like(tokens)
  targets[:, :-1], loss_mask[:, -1] = tokens[:, 1:], 0
  return {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'targets': targets, 'loss_mask': loss_mask,
          'positions': np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()}


def _lowered_train_step(config, batch):
  """The loop's train step, lowered for one device from abstract state (nothing runs or compiles)."""
  config.batch_size = len(batch[next(iter(batch))])
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.logical_rules(config.sharding_rules)
  model, objective = loop.build_model(config), objectives.make_objective(config.task)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = steps.build(config, mesh, rules, model, objective, adapters.make_adapter(None),
                      objective.example_input(batch))
    state = checkpoint_lib.abstract_with_shardings(fns.abstract_state, fns.state_shardings)
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fns.batch_sharding), batch)
    return fns.train.lower(state, {}, specs, fns.learning_rates[0])


def _nfnet_config():
  c = nfnet_digits.get_config()
  # Stride 1 until the last stage: XLA counts no multiply-adds on the zero padding of a SAME convolution,
  # the analytic count (the paper's) does, and that gap grows as feature maps shrink (9x at 1x1).
  c.model.update(widths=(128, 256), depths=(1, 1), stem_widths=None, stem_strides=(1, 1, 1, 1),
                 stage_strides=(1, 2), conv_impl='native', dropout=0.0, stochastic_depth=0.0)
  return c, _images(16), (32, 32, 3)


def _vit_config():
  c = vit_digits.get_config()
  c.model.update(width=192, depth=2, mlp_dim=768, num_heads=3, patch_size=4)
  return c, _images(16), (32, 32, 3)


def _mistral_config():
  c = mistral_tiny.get_config()
  c.model.update(embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                 sliding_window=16, attention_impl='masked')
  return c, _tokens(16, 64, c.model.vocab_size), (64,)


@pytest.mark.parametrize('make', [_nfnet_config, _vit_config, _mistral_config], ids=['nfnet', 'vit', 'mistral'])
def test_analytic_training_flops_match_xla(make):
  config, batch, input_shape = make()
  xla = compute.measured_train_flops(_lowered_train_step(config, batch), config)
  analytic = compute.train_flops_per_example(config, input_shape)
  print(f'{config.model_name}: XLA / analytic training FLOPs per example = {xla / analytic:.4f}')
  # XLA also counts the elementwise work (norms, activations, softmax, the optimizer) and skips the
  # input's gradient; the matmuls and convolutions dominate these shapes.
  assert xla == pytest.approx(analytic, rel=0.05)


def test_blockwise_attention_counts_the_computed_key_tiles():
  config, batch, input_shape = _mistral_config()
  config.model.update(attention_impl='blockwise', block_size=16)
  xla = compute.measured_train_flops(_lowered_train_step(config, batch), config)
  analytic = compute.train_flops_per_example(config, input_shape)
  print(f'mistral blockwise: XLA / analytic training FLOPs per example = {xla / analytic:.4f}')
  assert xla == pytest.approx(analytic, rel=0.05)


def test_attention_pairs_computed_and_causal():
  kwargs = dict(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, sliding_window=4,
                vocab_size=64, norm_eps=1e-5, rope_theta=1e4)
  per_pair = 2 * 2 * 2 * 4 * 8  # FLOPs/MAC x (scores, weighted sum) x layers x heads x head_dim
  masked = mistral.forward_flops({**kwargs, 'attention_impl': 'masked'}, (16,))
  causal = mistral.forward_flops({**kwargs, 'attention_impl': 'masked'}, (16,), attention='causal')
  blockwise = mistral.forward_flops({**kwargs, 'attention_impl': 'blockwise', 'block_size': 4}, (16,))
  # 16 x 16 pairs; min(i + 1, 4) keys = 1 + 2 + 3 + 12 x 4 = 58; 4 query blocks x 2 key blocks of 4 x 4.
  assert masked - causal == (256 - 58) * per_pair
  assert masked - blockwise == (256 - 4 * 2 * 16) * per_pair
  with pytest.raises(ValueError, match="attention must be 'computed' or 'causal'"):
    mistral.forward_flops(kwargs, (16,), attention='full')


def test_mistral_7b_matches_the_maxtext_formula():
  # 6 x tokens x (layer matmul params + LM head) + 6 x S^2 x heads x head_dim per layer (causal; W = S here).
  s, layer_params = 4096, 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336
  expected = 6 * s * (32 * layer_params + 4096 * 32000) + 32 * 6 * s * s * 32 * 128
  assert 3 * mistral.forward_flops(MISTRAL_7B, (s,), attention='causal') == pytest.approx(expected, rel=1e-3)


def test_vit_and_nfnet_published_counts():
  # ViT-B/16 at 224: 17.56 G multiply-adds; NFNet-F0 at 256: the paper's 12.38 B.
  vit_b16 = vit.forward_flops(dict(variant='B/16', num_classes=1000), (224, 224, 3))
  assert vit_b16 / 2 == pytest.approx(17.56e9, rel=1e-3)
  nfnet_f0 = nfnet.forward_flops(dict(variant='F0', num_classes=1000), (256, 256, 3))
  assert nfnet_f0 / 2 == pytest.approx(12.38e9, rel=1e-3)


def _config(model_name='vit', model=None, batch_size=128, **budget):
  c = ml_collections.ConfigDict()
  c.model_name = model_name
  c.model = model or dict(num_classes=10, width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=2, pool_type='gap')
  c.task = dict(name='classification')
  c.batch_size = batch_size
  c.budget = budget
  return c


def test_budget_to_steps_by_hand():
  # vit_digits on 8x8x1: 16 tokens; MACs = patches 16*4*64 + 4 x (qkv/out 4*16*64^2 + attention 2*16^2*64
  # + MLP 2*16*64*128) + head 64*10 = 2,232,960; training FLOPs = 3 x 2 x MACs.
  config = _config(core_hours=0.5, hardware='tpu_v4', mfu=0.4)
  assert compute.train_flops_per_example(config, (8, 8, 1)) == 13_397_760
  # floor(0.5 h x 3600 x 137.5e12 x 0.4 / (13,397,760 x 128)) = floor(57,728,866.6)
  assert compute.resolve_budget(config, num_train_examples=None, input_shape=(8, 8, 1)) == 57_728_866
  # ceil(0.5 x 1437 / 64) = ceil(11.2)
  config = _config(batch_size=64, epochs=0.5)
  assert compute.resolve_budget(config, num_train_examples=1437, input_shape=(8, 8, 1)) == 12
  # Epochs written as steps x batch / examples give those steps back, float rounding or not.
  for n in (1050, 1066, 1281167):
    config = _config(batch_size=16, epochs=16 * 20 / n)
    assert compute.resolve_budget(config, num_train_examples=n, input_shape=(8, 8, 1)) == 20
  # A budget that buys less than one step still takes one.
  assert compute.resolve_budget(_config(core_hours=1e-12, hardware='h100', mfu=0.5), num_train_examples=None,
                                input_shape=(8, 8, 1)) == 1


def test_nfnet_f7_plus_eight_jft_epochs_cost_39k_tpu_v4_core_hours():
  images, epochs, batch = 4_000_000_000, 8, 4096
  macs = nfnet.count(dict(variant='F7+', num_classes=1000), 224)['macs']
  assert macs == pytest.approx(100.7e9, rel=1e-3)
  by_hand = 3 * 2 * macs * images * epochs / 137.5e12 / 3600
  assert by_hand == pytest.approx(39_074, abs=1)
  config = _config('nfnet', dict(variant='F7+', num_classes=1000), batch, epochs=epochs)
  steps = compute.resolve_budget(config, num_train_examples=images, input_shape=(224, 224, 3))
  assert steps == 7_812_500  # 8 x 4e9 / 4096
  flops = steps * batch * compute.train_flops_per_example(config, (224, 224, 3))
  assert compute.estimated_core_hours(flops, 'tpu_v4') == pytest.approx(by_hand, rel=1e-9)
  # The same run as a core-hour budget at 100% buys the same steps; the paper's 110k at 35% about as many.
  full = _config('nfnet', dict(variant='F7+', num_classes=1000), batch, core_hours=by_hand, hardware='tpu_v4', mfu=1.0)
  assert abs(compute.resolve_budget(full, num_train_examples=None, input_shape=(224, 224, 3)) - steps) <= 1
  paper = _config('nfnet', dict(variant='F7+', num_classes=1000), batch, core_hours=110e3, hardware='tpu_v4', mfu=0.35)
  assert compute.resolve_budget(paper, num_train_examples=None, input_shape=(224, 224, 3)) / steps == pytest.approx(
      110e3 * 0.35 / by_hand)


@pytest.mark.parametrize('budget, message', [
    (dict(core_hours=10, epochs=1), 'budget sets both core_hours and epochs; set exactly one'),
    (dict(hardware='tpu_v4', mfu=0.4), 'budget sets neither core_hours nor epochs; set exactly one'),
    (dict(core_hours=10, hardware='tpu_v9', mfu=0.4), "budget.hardware='tpu_v9' is unknown; choose one of"),
    (dict(core_hours=10, mfu=0.4), 'budget.core_hours needs budget.hardware, one of'),
    (dict(core_hours=10, hardware='tpu_v4'), 'budget.core_hours needs budget.mfu, the expected utilisation'),
    (dict(core_hours=10, hardware='tpu_v4', mfu=0.0), r'budget.mfu=0.0 must be in \(0, 1\]'),
    (dict(core_hours=10, hardware='tpu_v4', mfu=1.5), r'budget.mfu=1.5 must be in \(0, 1\]'),
    (dict(epochs=1, mfu=35), r'budget.mfu=35 must be in \(0, 1\]'),
    (dict(epochs=-1), 'budget.epochs=-1 must be positive'),
    (dict(epoch=2), r"budget has unknown fields \['epoch'\]"),
])
def test_bad_budgets_fail_with_one_line(budget, message):
  with pytest.raises(ValueError, match=message) as error:
    compute.resolve_budget(_config(**budget), num_train_examples=1000, input_shape=(8, 8, 1))
  assert '\n' not in str(error.value)


def test_cpu_core_hours_budget_uses_the_measured_peak_and_a_resume_keeps_its_length(tmp_path, monkeypatch):
  config = _config(core_hours=1e-4, hardware='cpu', mfu=0.5)
  monkeypatch.setattr(compute, '_cpu_peak_flops', lambda: 2e10)
  per_example = compute.train_flops_per_example(config, (8, 8, 1))
  steps = compute.resolve_budget(config, num_train_examples=None, input_shape=(8, 8, 1))
  assert steps == int(1e-4 * 3600 * 2e10 * 0.5 // (per_example * config.batch_size))
  # Started once (config.json with its resolved length, and checkpoints): the length is kept, whatever the
  # peak measured at the next start; with another budget or before any checkpoint it is resolved afresh.
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(json.dumps({'budget': config.budget.to_dict(), 'total_steps': steps}))
  assert loop._budgeted_steps_so_far(config, str(tmp_path)) == steps
  config.budget.core_hours = 2e-4
  assert loop._budgeted_steps_so_far(config, str(tmp_path)) is None
  (tmp_path / 'checkpoints').rmdir()
  config.budget.core_hours = 1e-4
  assert loop._budgeted_steps_so_far(config, str(tmp_path)) is None


def test_core_hours_utilisation_and_hardware():
  assert compute.core_hours(8, 1800, 'tpu_v4') == 8.0  # 8 chips x 2 TensorCores x 0.5 h
  assert compute.core_hours(8, 1800, 'tpu_v5e') == compute.core_hours(8, 1800, None) == 4.0
  assert compute.utilisation(137.5e12 * 3600 * 0.25, 1.0, 'tpu_v4') == pytest.approx(0.25)
  assert compute.PEAK_FLOPS['tpu_v5p'] * compute.CORES_PER_DEVICE['tpu_v5p'] == 459e12
  kinds = {'TPU v4': 'tpu_v4', 'TPU v5 lite': 'tpu_v5e', 'TPU v5': 'tpu_v5p', 'TPU v5p': 'tpu_v5p',
           'TPU v6 lite': 'tpu_v6e', 'NVIDIA H100 80GB HBM3': 'h100', 'NVIDIA A100-SXM4-40GB': None}
  for kind, name in kinds.items():
    assert compute.detect_hardware(types.SimpleNamespace(platform='gpu', device_kind=kind)) == name, kind
  assert compute.detect_hardware(jax.devices('cpu')[0]) == 'cpu'
  assert compute.measured_train_flops(None, ml_collections.ConfigDict({'model': {'scan': True}})) is None


def test_num_train_examples(digits_dir):
  data = dict(name='digits', data_dir=digits_dir, train_split='train')
  assert pipeline.num_train_examples(data) == 1437
  assert pipeline.num_train_examples({**data, 'mix': dict(mixup_alpha=0.2)}) == 718  # two per mixed example
  assert pipeline.num_train_examples({'name': 'not_counted', 'num_train_examples': 4_000_000_000}) == 4e9


def test_epochs_budget_sets_the_loop_length_and_compute_metrics(digits_dir, tmp_path, capsys, tiny_config):
  c = tiny_config(digits_dir, batch_size=64, eval_batch_size=64, total_steps=0, log_every_steps=5,
                  checkpoint_every_steps=100)
  c.budget = dict(epochs=0.5, hardware='cpu', mfu=0.3)
  out = loop.train(c, str(tmp_path))
  assert c.total_steps == out['step'] == 12  # ceil(0.5 x 1437 / 64)
  printed = capsys.readouterr().out
  assert ('budget: 0.5 epochs of 1437 examples = 12 steps of batch 64 | analytic 112 kFLOP/example (train) | '
          'est. ') in printed
  assert 'core-hours on cpu at mfu 0.3' in printed
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [5, 10, 12]
  # 4 tokens of width 16: MACs = patches 4*16*16 + 2 x (4*4*16^2 + 2*4^2*16 + 2*4*16*32) + head 16*10 = 18,592.
  assert records[0]['compute/flops_per_example_analytic'] == 3 * 2 * 18_592
  assert records[0]['compute/flops_per_example_xla'] > 0
  assert all('compute/flops_per_example_analytic' not in r for r in records[1:])
  for r in records:
    assert r['compute/train_flops'] == r['step'] * 64 * 3 * 2 * 18_592
    assert 0 < r['compute/mfu'] < 1
  hours = [r['compute/core_hours'] for r in records]
  assert 0 < hours[0] < hours[1] < hours[2]


def test_sam_doubles_the_training_flops_and_xla_agrees():
  config, batch, input_shape = _vit_config()
  plain = compute.train_flops_per_example(config, input_shape)
  config.optimizer.sam_rho = 0.05
  analytic = compute.train_flops_per_example(config, input_shape)
  # The ascent-point gradient is a second full forward and backward of the same batch.
  assert analytic == 2 * plain
  xla = compute.measured_train_flops(_lowered_train_step(config, batch), config)
  print(f'vit + SAM: XLA / analytic training FLOPs per example = {xla / analytic:.4f}')
  assert xla == pytest.approx(analytic, rel=0.05)


def test_the_training_resolution_is_read_from_the_last_crop_or_resize():
  assert compute.pp_image_size('decode|inception_crop(224)|flip_lr|keep("image")') == 224
  assert compute.pp_image_size('decode|resize_small(448)|central_crop(384)|value_range(-1, 1)') == 384
  assert compute.pp_image_size('decode|flip_lr') is None
