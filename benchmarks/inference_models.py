"""The published NFNets and ViTs that `benchmarks.inference_comparison` sets side by side, and their costs.

Every published figure below is from /work/shared/reference/inference.md's sources, converted to ONE unit:
FLOPs = 2 x multiply-accumulates. Brock et al.'s (2021) NFNet "FLOPs" and MaxViT's Table 3 are MACs (doubled
here); Zhai et al.'s (2021) and Alabdulmohsin et al.'s (2023) GFLOPs are already 2 x MACs.

`cost(entry)` counts our own model of each entry: parameters (abstract shapes at its evaluation resolution),
analytic FLOPs per image (`models.<family>.forward_flops`) and, from XLA's analysis of the eval forward compiled
for abstract arguments (`jax.jit(...).lower(ShapeDtypeStructs).compile()`: nothing is allocated), XLA's FLOPs
per image and its temporaries at batch 1 and per extra image. The ViTs are compiled unscanned: XLA counts a
loop body once, and a scanned forward copies each layer's stacked weights into its temporaries (measured:
ViT-B/16 at 384, 54 MiB scanned against 34 MiB unrolled), while unrolled ones compile in a few seconds here.
"""
import dataclasses
import time

import jax
import jax.numpy as jnp

from benchmarks import inference
from models import common, nfnet, vit

MODULES = {'nfnet': nfnet, 'vit': vit}


@dataclasses.dataclass(frozen=True)
class Entry:
  family: str            # 'nfnet' or 'vit'
  name: str              # e.g. 'F0', 'B/16'
  resolution: int        # evaluation resolution of the published top-1
  top1: float            # ImageNet top-1 (%)
  pretrain: str          # pretraining data
  params_m: float | None   # published parameters (millions)
  gflops: float | None     # published inference GFLOPs per image at `resolution` (2 x MACs)
  source: str
  kwargs: tuple = ()       # extra Model kwargs (pooling, NFNet stage-1 width)

  @property
  def label(self) -> str:
    return f'{"NFNet-" if self.family == "nfnet" else "ViT-"}{self.name}@{self.resolution}'

  def model_kwargs(self, **overrides) -> dict:
    variant = {'nfnet': dict(variant=self.name), 'vit': dict(variant=self.name, scan=False)}[self.family]
    return {'num_classes': 1000, 'dtype': 'float32', **variant, **dict(self.kwargs), **overrides}


_PAPER_PLUS = (('plus_stage1_width', 'paper'),)  # the paper's 192-wide stage-1 bottleneck of the + variants
_MAP = (('pool_type', 'map'),)  # big_vision's attention-pooling head (g/14, G/14, So400m/14)
_BROCK = 'Brock et al. 2021 Table 3 (MACs x 2)'
ENTRIES = (
    Entry('nfnet', 'F0', 256, 83.6, 'ImageNet-1k', 71.5, 2 * 12.38, _BROCK),
    Entry('nfnet', 'F1', 320, 84.7, 'ImageNet-1k', 132.6, 2 * 35.54, _BROCK),
    Entry('nfnet', 'F2', 352, 85.1, 'ImageNet-1k', 193.8, 2 * 62.59, _BROCK),
    Entry('nfnet', 'F3', 416, 85.7, 'ImageNet-1k', 254.9, 2 * 114.76, _BROCK),
    Entry('nfnet', 'F4', 512, 85.9, 'ImageNet-1k', 316.1, 2 * 215.24, _BROCK),
    Entry('nfnet', 'F5', 544, 86.0, 'ImageNet-1k', 377.2, 2 * 289.76, _BROCK),
    Entry('nfnet', 'F4+', 512, 89.2, 'JFT-300M', 527.0, 2 * 367.0, 'Brock et al. 2021 Table 5 (MACs x 2)',
          _PAPER_PLUS),
    Entry('nfnet', 'F7+', 480, 90.4, 'JFT-4B', None, None, 'Smith et al. 2023 (no params or FLOPs published; '
          'the reference file extrapolates ~830M and ~1.0 TFLOPs)', _PAPER_PLUS),
    Entry('vit', 'B/16', 384, 84.15, 'JFT-300M', 86.0, 111.3, 'Dosovitskiy et al. 2020 Table 5; Zhai et al. 2021 '
          'Table 2'),
    Entry('vit', 'L/16', 384, 85.2, 'ImageNet-21k', 303.0, 382.8, 'MaxViT Table 3 (ViT I21k); Zhai et al. Table 2'),
    Entry('vit', 'L/16', 512, 87.76, 'JFT-300M', 305.0, 2 * 364.0, 'Dosovitskiy et al. Table 2; MaxViT Table 3 '
          '(MACs x 2)'),
    Entry('vit', 'H/14', 518, 88.55, 'JFT-300M', 632.0, 2 * 1021.0, 'Dosovitskiy et al. Table 2; MaxViT Table 3 '
          '(MACs x 2)'),
    Entry('vit', 'So400m/14', 518, 90.3, 'JFT-3B', 428.0, 1374.0, 'Alabdulmohsin et al. 2023 Table 1', _MAP),
    Entry('vit', 'g/14', 518, 90.2, 'JFT-3B', 1011.0, 3208.0, 'Alabdulmohsin et al. 2023 Table 1', _MAP),
    Entry('vit', 'G/14', 518, 90.45, 'JFT-3B', 1843.0, 5668.0, 'Zhai et al. 2021 Tables 1-2 (1882M in '
          'Alabdulmohsin et al.); Alabdulmohsin et al. Table 1', _MAP),
)
BY_LABEL = {e.label: e for e in ENTRIES}

# Accuracy-matched groups: (what matches, NFNet labels, ViT labels). The pretraining data differ within most
# groups (ImageNet-1k NFNets against ViTs pretrained on JFT or ImageNet-21k): matched in accuracy, not recipe.
PAIRS = (
    ('~84% top-1', ('NFNet-F0@256', 'NFNet-F1@320'), ('ViT-B/16@384',)),
    ('~85.5% top-1', ('NFNet-F2@352', 'NFNet-F3@416'), ('ViT-L/16@384',)),
    ('~88-89%, both JFT-300M', ('NFNet-F4+@512',), ('ViT-L/16@512', 'ViT-H/14@518')),
    ('~90.3%, JFT-4B vs JFT-3B', ('NFNet-F7+@480',), ('ViT-So400m/14@518', 'ViT-g/14@518', 'ViT-G/14@518')),
)

# The resolution sweep: accuracy-matched models at every resolution the ViT patch (16) divides.
SWEEP_MODELS = (('nfnet', 'F0'), ('nfnet', 'F1'), ('vit', 'B/16'), ('vit', 'L/16'))
SWEEP_RESOLUTIONS = (128, 224, 320, 384, 512)


def compile_abstract(module, kwargs: dict, resolution: int, batch: int):
  """(compiled eval forward for abstract params and images, compile seconds); nothing is allocated."""
  model = module.Model(**kwargs)
  params = common.abstract_params(model, (1, resolution, resolution, 3))
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  start = time.perf_counter()
  compiled = inference.forward(model).lower(params, images).compile()
  return compiled, time.perf_counter() - start


def model_cost(family: str, kwargs: dict, resolution: int, memory_batch: int = 8) -> dict:
  """Our model's parameters, analytic and XLA FLOPs per image, and XLA's temporaries (MiB) at batch 1 and per
  extra image (temp(memory_batch) - temp(1)) / (memory_batch - 1)."""
  module = MODULES[family]
  one, seconds = compile_abstract(module, kwargs, resolution, 1)
  many, more = compile_abstract(module, kwargs, resolution, memory_batch)
  temp1, temp_b = inference.memory(one).get('temp'), inference.memory(many).get('temp')
  xla = inference.xla_flops(one)
  return dict(params=common.count_params(module.Model(**kwargs), (1, resolution, resolution, 3)),
              gflops=module.forward_flops(kwargs, (resolution, resolution, 3)) / 1e9,
              xla_gflops=None if xla is None else xla / 1e9,
              args_mib=inference.memory(one).get('argument'), temp1_mib=temp1,
              temp_per_image_mib=None if temp1 is None else (temp_b - temp1) / (memory_batch - 1),
              compile_s=seconds + more)


def cost(entry: Entry, memory_batch: int = 8) -> dict:
  return model_cost(entry.family, entry.model_kwargs(), entry.resolution, memory_batch)


def resolution_sweep(memory_batch: int = 8, resolutions=SWEEP_RESOLUTIONS, models=SWEEP_MODELS, log=print) -> list:
  """Rows of (model, resolution, cost) for the sweep models at every resolution."""
  rows = []
  for family, name in models:
    for res in resolutions:
      kwargs = Entry(family, name, res, 0.0, '', None, None, '').model_kwargs()
      rows.append(dict(family=family, model=name, resolution=res, **model_cost(family, kwargs, res, memory_batch)))
      log(f'  {family} {name} @{res}: {rows[-1]["gflops"]:.4g} GFLOPs/img, temp {rows[-1]["temp1_mib"]:.1f} MiB '
          f'at batch 1 (+{rows[-1]["temp_per_image_mib"]:.1f} MiB per image)')
  return rows


def head_params(name: str, resolution: int = 224) -> tuple[int, int]:
  """(parameters with the attention-pooling head, with a class token instead) of ViT `name` at `resolution`:
  the MAP head is what separates the two published ViT-G/14 counts (1843M, 1882M)."""
  kwargs = Entry('vit', name, resolution, 0.0, '', None, None, '').model_kwargs(scan=True)  # fast to trace
  return (vit.param_count({**kwargs, 'pool_type': 'map'}, resolution),
          vit.param_count({**kwargs, 'pool_type': 'tok'}, resolution))
