"""The report of a distilled-preference pipeline (configs/zephyr_cpu.py): report.md and report.png in its workdir.

Results (a function of the stages' outputs only, so a resumed pipeline writes the same section):
  win rate  of policy `a` over `b` on held-out prompts: per prompt, 1 if the judge scored a's answer above b's,
            1/2 on a tie, else 0 (a prompt with several samples per side compares their mean scores); the mean,
            with a 95% Wilson score interval over the prompts (ties counted as half a win).
  reward accuracy  the DPO run's `eval/rewards/accuracies` on its held-out pairs, before and after training.
  SFT loss  each model's held-out loss: minus the token-weighted mean of its per-token log-likelihoods of the
            held-out answers (`python -m train.judge` scores with the model as the judge), and its exponential.
  data      rows, prompts skipped, finished answers (ended at EOS) and mean length of each generated file; pairs
            made and prompts skipped by the judge; the DPO run's pairs kept, truncated and skipped per split.
Then the wall time of each stage (every attempt, summed; a resumed stage has several), which differs run to run.
"""
import collections
import json
import math
import os

from train import metrics as metrics_lib

DPO_METRICS = ('loss', 'rewards/accuracies', 'rewards/margins', 'rewards/chosen', 'rewards/rejected',
               'logps/chosen', 'logps/rejected')


def scores_path(out: str) -> str:
  """Where `python -m train.judge --out=OUT` writes its per-candidate scores."""
  return out[:-len('.jsonl')] + '.scores.jsonl' if out.endswith('.jsonl') else out + '.scores.jsonl'


def _rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
  """The 95% Wilson score interval of a proportion successes / n."""
  if n == 0:
    return float('nan'), float('nan')
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return centre - half, centre + half


def win_rate(scores: str, a: str, b: str) -> dict:
  """Wins of source `a` over `b` in a judge's scores file (see the module docstring)."""
  by_prompt = collections.defaultdict(lambda: collections.defaultdict(list))
  for row in _rows(scores_path(scores)):
    if row['score'] is not None:  # None: too long for the judge to score (counted as unmatched below)
      by_prompt[row['prompt_id']][row['source']].append(row['score'])
  outcomes = []
  for sides in by_prompt.values():
    if sides.get(a) and sides.get(b):
      sa, sb = (sum(sides[s]) / len(sides[s]) for s in (a, b))
      outcomes.append(1.0 if sa > sb else 0.5 if sa == sb else 0.0)
  if not outcomes:
    raise ValueError(f'{scores_path(scores)} holds no prompt scored for both {a!r} and {b!r}; check the sources '
                     'the generate stages wrote.')
  wins = sum(outcomes)
  lo, hi = wilson(wins, len(outcomes))
  return dict(rate=wins / len(outcomes), low=lo, high=hi, prompts=len(outcomes),
              wins=sum(o == 1.0 for o in outcomes), ties=sum(o == 0.5 for o in outcomes),
              losses=sum(o == 0.0 for o in outcomes), unmatched=len(by_prompt) - len(outcomes))


def sft_loss(out: str) -> dict:
  every = _rows(scores_path(out))
  rows = [r for r in every if r['score'] is not None]
  tokens = sum(r['num_tokens'] for r in rows)
  if not tokens:
    raise ValueError(f'{scores_path(out)} scored no tokens.')
  loss = -sum(r['score'] * r['num_tokens'] for r in rows) / tokens
  return dict(loss=loss, perplexity=math.exp(loss), answers=len(rows), tokens=tokens, unscored=len(every) - len(rows))


def dpo_evals(run: str) -> tuple[dict, dict]:
  """The DPO run's first and last held-out evaluation: {metric: value} with 'step'."""
  evals = [r for r in metrics_lib.read_metrics(run) if 'eval/rewards/accuracies' in r]
  if not evals:
    raise ValueError(f'{run} logged no eval/rewards/accuracies; is it a finished preference run?')
  pick = lambda r: {'step': r['step'], **{m: r.get(f'eval/{m}') for m in (*DPO_METRICS, 'pairs')}}  # noqa: E731
  return pick(evals[0]), pick(evals[-1])


def generated(path: str, prompts: str) -> dict:
  """A generation stage's output `path` from the prompt file `prompts`: rows, prompts answered and skipped (too
  long for the model: train.generate's log says so), answers ended at EOS, mean answer length."""
  rows = _rows(path)
  finished = sum(bool(r.get('finished')) for r in rows)
  lengths = [r['num_tokens'] for r in rows if 'num_tokens' in r]
  answered = len({r['prompt_id'] for r in rows})
  return dict(rows=len(rows), skipped=len(_rows(prompts)) - answered, finished=finished,
              mean_tokens=sum(lengths) / max(len(lengths), 1))


def dpo_data(run: str) -> dict[str, dict]:
  """The DPO run's pairs per split as its data format counts them: kept whole, truncated, skipped."""
  from data import formats
  from train import runs
  config = runs.read_config(run)
  fmt = formats.get_format(config.data)
  return {config.data[key]: dict(fmt.split_counts(config.data, key)) for key in ('train_split', 'eval_split')}


def pairs_summary(pairs: str) -> dict:
  made = _rows(pairs)
  judged = {r['prompt_id'] for r in _rows(scores_path(pairs))}
  chosen = collections.Counter(p.get('source_chosen', '?') for p in made)
  margin = [p['score_chosen'] - p['score_rejected'] for p in made if 'score_chosen' in p]
  return dict(pairs=len(made), prompts=len(judged), skipped=len(judged) - len(made), chosen=dict(sorted(chosen.items())),
              mean_margin=sum(margin) / max(len(margin), 1))


def stage_times(workdir: str) -> dict[str, tuple[float, int, int]]:
  """stage -> (seconds over the attempts that ended, attempts started, attempts ended), from WORKDIR/stages.jsonl:
  an attempt killed with the pipeline logged its start only."""
  times = {}
  path = os.path.join(workdir, 'stages.jsonl')
  for r in (_rows(path) if os.path.exists(path) else []):
    if r['kind'] == 'report':  # the report's own attempt is running as it writes
      continue
    seconds, started, ended = times.get(r['stage'], (0.0, 0, 0))
    if 'started' in r:
      times[r['stage']] = (seconds, started + 1, ended)
    else:
      times[r['stage']] = (seconds + r['seconds'], started, ended + 1)
  return times


def results(win_rate: dict, dpo_run: str, sft_losses: dict, pairs: str, generated_files: dict) -> str:
  """The Markdown of the results: a function of the stages' outputs only."""
  w = globals()['win_rate'](**win_rate)
  first, last = dpo_evals(dpo_run)
  lines = ['## Results', '',
           f'Win rate of {win_rate["a"]} over {win_rate["b"]} on {w["prompts"]} held-out prompts, judged by the '
           f'teacher: **{w["rate"]:.3f}** (95% interval {w["low"]:.3f}-{w["high"]:.3f}; {w["wins"]} wins, '
           f'{w["ties"]} ties, {w["losses"]} losses' + (f'; {w["unmatched"]} prompts without both answers' if
                                                      w['unmatched'] else '') + ').', '',
           f'DPO on held-out pairs ({int(last["pairs"] or 0)} pairs), before and after training:', '',
           '| step | loss | reward accuracy | reward margin | chosen reward | rejected reward |',
           '|---|---|---|---|---|---|']
  for r in (first, last):
    lines.append(f'| {r["step"]} | {r["loss"]:.4f} | {r["rewards/accuracies"]:.3f} | {r["rewards/margins"]:.4f} | '
                 f'{r["rewards/chosen"]:.4f} | {r["rewards/rejected"]:.4f} |')
  lines += ['', 'Held-out SFT loss (the real answers to the held-out prompts, assistant tokens and EOS):', '',
            '| model | loss | perplexity | answers | tokens | too long to score |', '|---|---|---|---|---|---|']
  for label, out in sft_losses.items():
    s = sft_loss(out)
    lines.append(f'| {label} | {s["loss"]:.4f} | {s["perplexity"]:.3f} | {s["answers"]} | {s["tokens"]} | '
                 f'{s["unscored"]} |')
  p = pairs_summary(pairs)
  lines += ['', f'AI feedback: {p["prompts"]} prompts judged, {p["pairs"]} pairs made, {p["skipped"]} prompts skipped '
            '(identical answers or a single candidate: the judge\'s log names them); mean score margin chosen - '
            f'rejected {p["mean_margin"]:.4f}; chosen answers by source: ' +
            ', '.join(f'{k} {v}' for k, v in p['chosen'].items()) + '.', '',
            '| generated | rows | prompts skipped (too long) | ended at EOS | mean tokens |', '|---|---|---|---|---|']
  for label, (path, prompts) in generated_files.items():
    g = generated(path, prompts)
    lines.append(f'| {label} | {g["rows"]} | {g["skipped"]} | {g["finished"]} | {g["mean_tokens"]:.1f} |')
  lines += ['', 'DPO data: ' + '; '.join(
      f'{split} {c.get("kept", 0) + c.get("truncated", 0)} pairs ({c.get("truncated", 0)} truncated), '
      f'{c.get("skipped", 0)} skipped (no room for an answer)' for split, c in dpo_data(dpo_run).items()) + '.']
  return '\n'.join(lines) + '\n'


def plot(dpo_run: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = metrics_lib.read_metrics(dpo_run)
  panels = (('loss',), ('rewards/accuracies',), ('rewards/margins',), ('logps/chosen', 'logps/rejected'))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  for ax, names in zip(axes, panels):
    for name in names:
      for prefix, style in (('train', '-'), ('eval', 'o--')):
        points = [(r['step'], r[f'{prefix}/{name}']) for r in records if f'{prefix}/{name}' in r]
        if points:
          ax.plot(*zip(*points), style, label=f'{prefix}/{name}', markersize=4)
    ax.set_xlabel('step')
    ax.set_title(', '.join(names))
    ax.legend(fontsize=7)
  fig.suptitle('dDPO: preference metrics over steps')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(workdir: str, win_rate: dict, dpo_run: str, sft_losses: dict, pairs: str, runs: dict,
          generated: dict | None = None) -> str:
  """Writes WORKDIR/report.md and report.png; returns the Markdown."""
  body = results(win_rate, dpo_run, sft_losses, pairs, generated or {})
  times = stage_times(workdir)
  lines = ['# Distilled preference pipeline', '', 'Runs: ' + ', '.join(f'{k} `{v}`' for k, v in runs.items()) + '.',
           '', body, '## Wall time per stage', '',
           'Seconds of the attempts that ended; an attempt killed with the pipeline counts as started only.', '',
           '| stage | seconds | attempts started | ended |', '|---|---|---|---|']
  lines += [f'| {s} | {t:.0f} | {n} | {e} |' for s, (t, n, e) in times.items()]
  lines.append(f'| total | {sum(t for t, _, _ in times.values()):.0f} | | |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(text)
  plot(dpo_run, os.path.join(workdir, 'report.png'))
  print(text, flush=True)
  return text
