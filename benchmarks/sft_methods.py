r"""Instruction finetuning methods side by side on this CPU: full SFT, NEFTune, LoRA and QLoRA of one small model.

  python -m benchmarks.sft_methods --workdir=/tmp/sft_methods
  python -m benchmarks.sft_methods --workdir=/tmp/sft_methods --methods=full,neftune --steps=600

First a base model: configs/mistral_tiny.py (4 layers of width 128, byte tokens) pretrained for --base_steps on
the standard library's sources (--base_steps=0 finetunes from scratch instead; --base=DIR reuses a run). Then
each method is configs/mistral_sft.py from that base (`init=`) on the embedded instruction set `chat/stdlib`,
for the same --steps, batch and data order:

  full     every parameter, learning rate 1e-3
  neftune  the same with NEFTune noise, alpha 5 (`:neftune=5`)
  lora     LoRA r=16 on the seven projections (`:lora=16`: alpha 32, dropout 0.05, learning rate 3e-3)
  qlora    QLoRA r=64 over an NF4 base (`:qlora=64`: alpha 16, dropout 0.1, learning rate 3e-3)

Every run is its own `python -m train` process (rerunning this command resumes or skips finished runs), then
`python -m train.generate` answers --prompts held-out prompts greedily (the first user turns of the set's
validation split, which no run trains on; or --prompts_file). Prints a Markdown table (parameters, trainable parameters, the
start-up line's train-state bytes per device, the last checkpoint's bytes on disk, ms per step: the median
over the logged intervals after the first, train loss: the mean of the last three logged values, and the
held-out loss on the replies before and after) and each method's replies; writes WORKDIR/results.json.
--flags adds `python -m train` flags to every run (tests shrink the model with it).
"""
import json
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

from train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {'full': '', 'neftune': 'neftune=5', 'lora': 'lora=16', 'qlora': 'qlora=64'}

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs, their logs and results.json go.', required=True)
_METHODS = flags.DEFINE_list('methods', list(METHODS), f'Any of {list(METHODS)}.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Finetuning steps of every method.')
_BASE_STEPS = flags.DEFINE_integer('base_steps', 400, 'Pretraining steps of the base (0: finetune from scratch).')
_BASE = flags.DEFINE_string('base', None, 'A finished run of configs/mistral_tiny.py to start from instead.')
_PROMPTS = flags.DEFINE_integer('prompts', 3, 'Held-out prompts each method answers.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 160, 'Most tokens per reply.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'Prompts JSONL to answer instead (train.generate\'s '
                                    'format).')
_FLAGS = flags.DEFINE_multi_string('flags', [], 'A `python -m train` flag for every run, e.g. '
                                   '--flags=--config.model.num_layers=2.')


def _run(command: list[str], log: str) -> float:
  """Runs a command from the repository root, its output to `log`; returns its wall time; exits on failure."""
  start = time.perf_counter()
  with open(log, 'w') as f:
    code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
  if code:
    with open(log) as f:
      tail = f.read()[-3000:]
    sys.exit(f'{" ".join(command)} failed with exit code {code}; its log {log} ends:\n{tail}')
  return time.perf_counter() - start


def _train(config: str, workdir: str, *extra: str) -> tuple[float, str]:
  log = workdir + '.log'
  command = [sys.executable, '-m', 'train', f'--config={config}', f'--workdir={workdir}', *extra, *_FLAGS.value]
  seconds = _run(command, log)
  with open(log) as f:
    return seconds, f.read()


def _bytes_on_disk(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def summarize(workdir: str, log: str) -> dict:
  """One run's figures, from its metrics, its start-up line and its last checkpoint."""
  records = metrics.read_metrics(workdir)
  train = [r for r in records if 'train/loss' in r]
  evals = [r for r in records if 'eval/loss' in r]
  if not train or not evals:
    raise ValueError(f'{workdir}/metrics.jsonl has no train or eval records; rerun with --steps above the log '
                     'and eval intervals.')
  intervals = [1000 / r['perf/steps_per_s'] for r in train[1:]] or [1000 / train[0]['perf/steps_per_s']]
  state = re.search(r'\| state (.+?) per device \((.*?)\)', log)
  checkpoints = os.path.join(workdir, 'checkpoints')
  last = max((d for d in os.listdir(checkpoints) if d.isdigit()), key=int)
  return {
      'params': train[0]['compute/params'], 'trainable_params': train[0]['compute/trainable_params'],
      'state_per_device': state.group(1) if state else '?', 'state_parts': state.group(2) if state else '?',
      'checkpoint_bytes': _bytes_on_disk(os.path.join(checkpoints, last)),
      'ms_per_step': statistics.median(intervals),
      'train_loss': statistics.fmean(r['train/loss'] for r in train[-3:]),
      'eval_loss_start': evals[0]['eval/loss'], 'eval_loss': evals[-1]['eval/loss'], 'eval_step': evals[-1]['step'],
      'quantized_base': next((l for l in log.splitlines() if 'bytes per parameter' in l), ''),
  }


def _replies(workdir: str, prompts: str) -> list[dict]:
  out = workdir + '.replies.jsonl'
  _run([sys.executable, '-m', 'train.generate', f'--workdir={workdir}', f'--prompts={prompts}', f'--out={out}',
        '--temperature=0', f'--max_new_tokens={_MAX_NEW_TOKENS.value}'], workdir + '.generate.log')
  with open(out) as f:
    return [json.loads(line) for line in f if line.strip()]


def table(results: dict[str, dict]) -> str:
  rows = ['| method | parameters | trainable | train state per device | checkpoint | ms/step | train loss | '
          'held-out loss (start -> end) |', '|---' * 8 + '|']
  for name, r in results.items():
    rows.append(f'| {name} | {r["params"]:,} | {r["trainable_params"]:,} | {r["state_per_device"]} '
                f'({r["state_parts"]}) | {r["checkpoint_bytes"] / 2**20:.2f} MiB | {r["ms_per_step"]:.0f} | '
                f'{r["train_loss"]:.4f} | {r["eval_loss_start"]:.4f} -> {r["eval_loss"]:.4f} |')
  return '\n'.join(rows)


def main(argv):
  del argv
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise app.UsageError(f'--methods names {sorted(unknown)}; choose among {list(METHODS)}.')
  root = os.path.abspath(_WORKDIR.value)
  os.makedirs(root, exist_ok=True)
  base = _BASE.value
  if base is None and _BASE_STEPS.value:
    base = os.path.join(root, 'base')
    seconds, _ = _train('configs/mistral_tiny.py', base, f'--config.total_steps={_BASE_STEPS.value}')
    print(f'base: {_BASE_STEPS.value} steps of configs/mistral_tiny.py in {seconds:.0f} s -> {base}', flush=True)

  prompts = _PROMPTS_FILE.value
  if not prompts:
    from train.study import prompts as prompts_lib
    prompts = os.path.join(root, 'prompts.jsonl')
    prompts_lib.write(prompts, 'chat/stdlib', 'validation', _PROMPTS.value)

  results, replies = {}, {}
  for name in _METHODS.value:
    arg = ','.join(a for a in (METHODS[name], f'steps={_STEPS.value}', f'init={base}' if base else '') if a)
    workdir = os.path.join(root, name)
    seconds, log = _train(f'configs/mistral_sft.py:{arg}', workdir)
    results[name] = dict(summarize(workdir, log), wall_s=seconds, config=f'configs/mistral_sft.py:{arg}')
    replies[name] = _replies(workdir, prompts)
    print(f'{name}: {seconds:.0f} s, held-out loss {results[name]["eval_loss"]:.4f}', flush=True)

  print('\n' + table(results))
  for name, r in results.items():
    if r['quantized_base']:
      print(f'{name}: {r["quantized_base"].strip()}')
  for name, rows in replies.items():
    print(f'\n### {name}')
    for row in rows:
      print(f'\n> {row["prompt"]}\n\n{row["messages"][-1]["content"]!r}' + ('' if row['finished'] else ' [no EOS]'))
  with open(os.path.join(root, 'results.json'), 'w') as f:
    json.dump({'results': results, 'replies': replies}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
