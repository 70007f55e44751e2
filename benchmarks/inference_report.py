"""OUT/inference.md of `python -m benchmarks.inference_comparison`: the tables, from its result dictionary."""
import math

from benchmarks import inference_models as im
from benchmarks.inference import si, size

CAVEATS = '''\
- FLOPs are the models' analytic counts (2 x the MACs of every matmul and convolution); XLA's own count of the
  same compiled call is beside them (it adds norms, activations and softmax, and leaves out convolution taps
  that fall on padding). Published figures were converted to the same unit.
- Memory is XLA:CPU's analysis of the float32 eval forward (arguments: the parameters and the images;
  temporaries: activations and whatever XLA materialises). An NFNet's temporaries at batch 1 are mostly its
  weight-standardised kernels, recomputed at every call (the model standardises inside the forward, as timm's
  does): a deployment that folds the standardisation into the weights once would not hold them. XLA:TPU fuses
  more and runs bfloat16, so its figures are smaller; the ratios between models are what carries over.
- Accuracy-matched is not recipe-matched: the ImageNet-1k NFNets F0-F5 face ViTs pretrained on JFT-300M or
  ImageNet-21k; only F4+ against H/14 and L/16 at 512 share their pretraining data (JFT-300M), and F7+
  (JFT-4B) against g/14, G/14 and SoViT-400m/14 (JFT-3B) nearly so. F7+'s parameters and FLOPs were never
  published: ours come from the F7+ shape (depths 8/16/48/24, widths 384/768/2048/2048).
- FLOPs are not time. An NFNet's 3x3 convolutions are grouped (groups of 128 channels), a ViT is almost all
  large dense matmuls: on a TPU's matrix units or a GPU's tensor cores dense matmuls run near peak, grouped
  convolutions less so, and the two models' activation traffic differs. Smith et al. (2023) note that NFNets
  were tuned for TPU-v4 and do less well on other devices. Only a measurement on the target hardware, in its
  dtype and at its batch size, says which is faster there; a 2-core CPU says nothing about a TPU.
'''


def _pct(x) -> str:
  return '-' if x is None else f'{x:.2f}'


def _num(x, digits: int = 4) -> str:
  return '-' if x is None else f'{x:.{digits}g}'


def _mib(x) -> str:
  return size(x)


def _published_table(rows) -> list[str]:
  out = ['| model | pretraining | ImageNet top-1 | params (ours / published) | GFLOPs/img ours | XLA | published | '
         'parameters (float32) | XLA temp, batch 1 | + per image |', '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    pub = '-' if r['published_params_m'] is None else f'{r["published_params_m"]:g}M'
    out.append(f'| {r["label"]} | {r["pretrain"]} | {r["top1"]:g} | {r["params"] / 1e6:.1f}M / {pub} | '
               f'{r["gflops"]:.4g} | {_num(r["xla_gflops"])} | {_num(r["published_gflops"])} | '
               f'{_mib(r["args_mib"])} | {_mib(r["temp1_mib"])} | {_mib(r["temp_per_image_mib"])} |')
  return out


def _ratio(a, b) -> str:
  return '-' if a is None or b is None or not b else f'{a / b:.2f}x'


def pair_rows(result) -> list[dict]:
  """Every (NFNet, ViT) of the accuracy-matched groups with the NFNet's costs relative to the ViT's."""
  by_label = {r['label']: r for r in result['published']}
  rows = []
  for group, nfnets, vits in im.PAIRS:
    for n in nfnets:
      for v in vits:
        a, b = by_label[n], by_label[v]
        rows.append(dict(group=group, nfnet=n, vit=v, delta_top1=a['top1'] - b['top1'],
                         flops=a['gflops'] / b['gflops'], params=a['params'] / b['params'],
                         batch1=(a['args_mib'] + a['temp1_mib']) / (b['args_mib'] + b['temp1_mib']),
                         per_image=a['temp_per_image_mib'] / b['temp_per_image_mib']))
  return rows


def _pairs_table(result) -> list[str]:
  out = ['| matched at | NFNet | ViT | top-1 NFNet - ViT | FLOPs/img NFNet / ViT | params | XLA memory at batch 1 '
         '(params + temp) | XLA memory per extra image |', '|---|---|---|---:|---:|---:|---:|---:|']
  for p in pair_rows(result):
    out.append(f'| {p["group"]} | {p["nfnet"]} | {p["vit"]} | {p["delta_top1"]:+.2f} | {p["flops"]:.2f}x | '
               f'{p["params"]:.2f}x | {p["batch1"]:.2f}x | {p["per_image"]:.2f}x |')
  return out


def _exponent(rows, model: str, key: str) -> float:
  """d log(key) / d log(resolution) between the sweep's lowest and highest resolution."""
  pts = sorted((r['resolution'], r[key]) for r in rows if r['model'] == model)
  (r0, y0), (r1, y1) = pts[0], pts[-1]
  return math.log(y1 / y0) / math.log(r1 / r0)


def _sweep_tables(rows) -> list[str]:
  models = list(dict.fromkeys(r['model'] for r in rows))
  names = {m: ('NFNet-' if any(r['family'] == 'nfnet' for r in rows if r['model'] == m) else 'ViT-') + m
           for m in models}
  resolutions = sorted({r['resolution'] for r in rows})
  cell = {(r['model'], r['resolution']): r for r in rows}
  out = []
  for title, key, fmt in (('GFLOPs per image', 'gflops', lambda x: f'{x:.4g}'),
                          ('XLA temporaries per extra image', 'temp_per_image_mib', _mib),
                          ('XLA temporaries at batch 1', 'temp1_mib', _mib)):
    out += [f'{title}:', '', '| resolution | ' + ' | '.join(names[m] for m in models) + ' |',
            '|---:|' + '---:|' * len(models)]
    out += [f'| {res} | ' + ' | '.join(fmt(cell[m, res][key]) for m in models) + ' |' for res in resolutions]
    out.append('')
  lo, hi = resolutions[0], resolutions[-1]
  out.append(f'Growth from {lo} to {hi} px as resolution^k: FLOPs k = ' + ', '.join(
      f'{names[m]} {_exponent(rows, m, "gflops"):.2f}' for m in models) + '; memory per image k = ' + ', '.join(
      f'{names[m]} {_exponent(rows, m, "temp_per_image_mib"):.2f}' for m in models) + '.')
  return out


def _study(result) -> list[str]:
  if result.get('study_note'):
    return [result['study_note']]
  runs, pairs, measured = result['study_runs'], result['study_pairs'], result['study_measured']
  batch = result['study_batch']
  out = [f'Finetuned runs of {result["study_workdir"]} (textures test top-1; inference at the finetune '
         f'resolution {runs[0]["input_shape"][0]}x{runs[0]["input_shape"][1]}x{runs[0]["input_shape"][2]}):', '',
         '| family | model | pretraining epochs | lr | finetuned top-1 | params | FLOPs/img |',
         '|---|---|---:|---:|---:|---:|---:|']
  for r in sorted(runs, key=lambda r: (r['family'], r['gflops'], r['epochs'])):
    out.append(f'| {r["family"]} | {r["model"]} | {r["epochs"]:g} | {r["lr"]:g} | {r["top1"]:.2f}% | '
               f'{si(r["params"])} | {si(r["gflops"] * 1e9)} |')
  out += ['', f'Each family\'s cheapest run (analytic FLOPs) reaching each accuracy that both reach, within '
          f'{result["tolerance"]:g} points; measured here in fresh processes (`benchmarks.inference --workdir`, '
          f'median of 20 calls):', '',
          '| both reach | NFNet run (top-1) | ViT run (top-1) | FLOPs/img NFNet / ViT | images/s batch 1 NFNet / '
          f'ViT | images/s batch {batch} | p50 ms batch 1 | XLA temp per image |',
          '|---:|---|---|---|---|---|---|---|']
  for p in pairs:
    n, v = p['nfnet'], p['vit']
    rn, rv = measured[n['workdir']], measured[v['workdir']]
    per = [(r[1]['memory_mib']['temp'] - r[0]['memory_mib']['temp']) / (batch - 1) for r in (rn, rv)]
    out.append(f'| {p["level"]:.2f}% | {n["model"]} {n["epochs"]:g}ep ({n["top1"]:.2f}%) | {v["model"]} '
               f'{v["epochs"]:g}ep ({v["top1"]:.2f}%) | {si(n["gflops"] * 1e9)} / {si(v["gflops"] * 1e9)} | '
               f'{rn[0]["images_per_s"]:.0f} / {rv[0]["images_per_s"]:.0f} | '
               f'{rn[1]["images_per_s"]:.0f} / {rv[1]["images_per_s"]:.0f} | '
               f'{rn[0]["p50_ms"]:.3f} / {rv[0]["p50_ms"]:.3f} | {_mib(per[0])} / {_mib(per[1])} |')
  if result.get('study_notes'):
    out += ['', 'Left out: ' + '; '.join(result['study_notes'])]
  return out


def _measured(rows) -> list[str]:
  out = ['| model | batch | ours images/s | p50 ms | p95 ms | timm images/s | timm p50 ms | timm p95 ms | '
         'achieved GFLOP/s (ours) | XLA peak | process peak RSS |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    ref = r['reference']
    out.append(f'| {r["label"]} | {r["batch"]} | {r["images_per_s"]:.3g} | {r["p50_ms"]:.0f} | {r["p95_ms"]:.0f} | '
               f'{ref["images_per_s"]:.3g} | {ref["p50_ms"]:.0f} | {ref["p95_ms"]:.0f} | '
               f'{r["analytic_gflops_per_image"] * r["images_per_s"]:.1f} | {_mib(r["memory_mib"]["peak"])} | '
               f'{_mib(r["peak_rss_mib"])} |')
  return out


def markdown(result) -> str:
  b = result['memory_batch']
  lines = ['# NFNet or ViT at inference?', '',
           'One unit throughout: FLOPs = 2 x multiply-accumulates (Brock et al.\'s NFNet "FLOPs" and MaxViT\'s are '
           'MACs and are doubled here; Zhai et al.\'s and Alabdulmohsin et al.\'s GFLOPs are already 2 x MACs). '
           f'Memory: XLA\'s analysis of the float32 eval forward compiled for abstract arguments; "per image" is '
           f'(temporaries at batch {b} - at batch 1) / {b - 1}.', '',
           '## Published accuracy-matched models, counted with our models', '']
  lines += _published_table(result['published'])
  big = {n: im.head_params(n) for n in ('g/14', 'G/14', 'So400m/14')}
  lines += ['', 'ViT parameter counts include the position embedding of the evaluation resolution (published '
            'counts are at 224 px). At 224 px with / without the attention-pooling (MAP) head: ' + '; '.join(
                f'{n} {si(m)} / {si(t)}' for n, (m, t) in big.items()) + ' (so ViT-G/14\'s 1882M of Alabdulmohsin '
            'et al. counts the MAP head and Zhai et al.\'s 1843M does not).', '',
            '## At matched accuracy', '']
  lines += _pairs_table(result)
  lines += ['', '## Resolution and batch size', '']
  lines += _sweep_tables(result['sweep'])
  lines += ['', '## The study\'s CPU-trained NFNets and ViTs at equal held-out accuracy', '']
  lines += _study(result)
  if result.get('measured'):
    lines += ['', '## Measured on this machine (`--measure`)', '',
              'float32; F0 with conv_impl=taps (its grouped convolutions as per-tap einsums, fast on a CPU); '
              'timm in a fresh process on the same images (torch.inference_mode). p50/p95 over '
              f'{result["measured"][0]["repeats"]} calls after compilation and one warm-up.', '']
    lines += _measured(result['measured'])
  lines += ['', '## What these figures can and cannot say', '', CAVEATS]
  return '\n'.join(lines)
