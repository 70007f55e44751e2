"""OUT/inference.png of `python -m benchmarks.inference_comparison` (log-log panels)."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

COLORS = {'nfnet': 'tab:blue', 'vit': 'tab:orange'}
NAMES = {'nfnet': 'NFNet', 'vit': 'ViT'}


def _plain(ax, x: bool = False):
  """Plain numbers (16, not 1.6 x 10^1) on a log axis's ticks: every minor tick within a decade, else 2, 3, 5."""
  for axis in (ax.xaxis, ax.yaxis) if x else (ax.yaxis,):
    lo, hi = axis.get_view_interval()
    narrow = hi < 10 * lo
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    axis.set_minor_formatter(ticker.FuncFormatter(
        lambda v, _, narrow=narrow: f'{v:g}' if narrow or f'{v:e}'[0] in '235' else ''))


def _accuracy_panel(ax, rows):
  for family in ('nfnet', 'vit'):
    for jft in (False, True):
      pts = [r for r in rows if r['family'] == family and r['pretrain'].startswith('JFT') == jft]
      if pts:
        ax.scatter([r['gflops'] for r in pts], [100 - r['top1'] for r in pts], color=COLORS[family],
                   marker='o' if jft else 's', facecolors=COLORS[family] if jft else 'none',
                   label=f'{NAMES[family]} ({"JFT" if jft else "ImageNet-1k/21k"} pretraining)')
      for r in pts:
        ax.annotate(r['label'].split('-', 1)[1], (r['gflops'], 100 - r['top1']), fontsize=6,
                    xytext=(3, 2), textcoords='offset points')
  ax.set(xscale='log', yscale='log', xlabel='inference GFLOPs per image (ours, analytic; 2 x MACs)',
         ylabel='ImageNet top-1 error (%)', title='Published accuracy vs inference FLOPs')
  _plain(ax)
  ax.legend(fontsize=6)


def _sweep_panel(ax, rows, key, ylabel, title):
  for model in dict.fromkeys(r['model'] for r in rows):
    pts = sorted((r['resolution'], r[key], r['family']) for r in rows if r['model'] == model)
    family = pts[0][2]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', color=COLORS[family],
            linestyle='-' if model in ('F0', 'B/16') else '--', label=f'{NAMES[family]}-{model}')
  ax.set(xscale='log', yscale='log', xlabel='resolution (px)', ylabel=ylabel, title=title)
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xticks(sorted({r['resolution'] for r in rows}))
  _plain(ax, x=True)
  ax.legend(fontsize=7)


def _study_panel(ax, result):
  runs = result.get('study_runs') or []
  if not runs:
    ax.text(0.5, 0.5, result.get('study_note') or 'no study runs', ha='center', va='center', wrap=True, fontsize=7,
            transform=ax.transAxes)
    ax.set_axis_off()
    return
  for family in ('nfnet', 'vit'):
    pts = [r for r in runs if r['family'] == family]
    ax.scatter([r['gflops'] * 1e9 for r in pts], [100 - r['top1'] for r in pts], color=COLORS[family],
               label=NAMES[family])
    for r in pts:
      ax.annotate(f'{r["model"]} {r["epochs"]:g}ep', (r['gflops'] * 1e9, 100 - r['top1']), fontsize=6,
                  xytext=(3, 2), textcoords='offset points')
  ax.set(xscale='log', yscale='log', xlabel='inference FLOPs per image (analytic)',
         ylabel='finetuned top-1 error (%), textures test', title="The CPU study's finetuned models")
  _plain(ax)
  ax.legend(fontsize=7)


def plot(result, file) -> None:
  fig, axes = plt.subplots(2, 2, figsize=(12, 9))
  _accuracy_panel(axes[0, 0], result['published'])
  _sweep_panel(axes[0, 1], result['sweep'], 'gflops', 'GFLOPs per image', 'Inference FLOPs vs resolution')
  _sweep_panel(axes[1, 0], result['sweep'], 'temp_per_image_mib', 'MiB per image (XLA temporaries)',
               'Activation memory per extra image vs resolution')
  _study_panel(axes[1, 1], result)
  fig.tight_layout()
  fig.savefig(file, format='png', dpi=110)
  plt.close(fig)
