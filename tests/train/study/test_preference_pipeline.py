"""The pipeline runner (train/study/pipeline.py) and the preference report: stage plans checked before anything runs,
the win rate's interval against scipy's, and configs/zephyr_cpu.py:tiny=True end to end, killed (kill -9) in its
DPO stage and rerun, ending with the report of an uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import scipy.stats

from train.study import pipeline, preference_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _config(tmp_path, stages: str) -> str:
  path = tmp_path / 'pipe.py'
  path.write_text(textwrap.dedent(f'''
      def get_config(arg=None):
        return None

      def get_pipeline(arg=None):
        return {stages}
      '''))
  return str(path)


@pytest.mark.parametrize('stages, message', [
    ("[dict(name='a', kind='bake')]", r"stage 'a' has kind 'bake'; choose one of"),
    ("[dict(name='a', kind='generate', args=dict(workdir='{b}')), dict(name='b', kind='train', config='x')]",
     r"stage 'a' uses \{b\}, which is no earlier stage"),
    ("[dict(name='a', kind='report'), dict(name='a', kind='report')]", "stage name 'a' is empty, repeated"),
])
def test_a_bad_plan_is_one_line_before_anything_runs(tmp_path, stages, message):
  with pytest.raises(ValueError, match=message):
    pipeline.plan(_config(tmp_path, stages))
  with pytest.raises(ValueError, match='has no get_pipeline'):
    pipeline.plan(os.path.join(ROOT, 'configs', 'mistral_tiny.py'))


def test_the_plan_resolves_each_stage_to_its_command(tmp_path):
  stages = pipeline.plan('configs/zephyr_cpu.py:tiny=True')
  outputs = {s.name: pipeline.output(s, str(tmp_path)) for s in stages}
  by_name = {s.name: s for s in stages}
  ddpo = pipeline.command(by_name['ddpo'], str(tmp_path), outputs)
  assert ddpo[1:4] == ['-m', 'train', f'--config={ROOT}/configs/zephyr_cpu.py:tiny=True,reference=frozen,ddpo_lr=2e-05,stage=ddpo']
  assert f'--config.init_params={tmp_path}/dsft' in ddpo and f'--config.data.files={tmp_path}/pairs.jsonl' in ddpo
  judge = pipeline.command(by_name['pairs'], str(tmp_path), outputs)
  assert judge[2] == 'train.judge' and judge[-1] == f'--out={tmp_path}/pairs.jsonl'
  assert pipeline.command(by_name['report'], str(tmp_path), outputs) is None


def test_win_rate_and_its_wilson_interval_against_scipy(tmp_path):
  rows = []
  outcomes = [1] * 23 + [0] * 14 + [0.5] * 2  # 23 wins, 14 losses, 2 ties
  for i, o in enumerate(outcomes):
    a, b = {1: (-1.0, -2.0), 0: (-2.0, -1.0), 0.5: (-1.5, -1.5)}[o]
    rows += [{'prompt_id': f'p{i}', 'source': 'new', 'sample': 0, 'score': a, 'num_tokens': 3},
             {'prompt_id': f'p{i}', 'source': 'old', 'sample': 0, 'score': b, 'num_tokens': 5}]
  rows.append({'prompt_id': 'lonely', 'source': 'new', 'sample': 0, 'score': -1.0, 'num_tokens': 2})
  (tmp_path / 'w.scores.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  got = preference_report.win_rate(str(tmp_path / 'w.jsonl'), 'new', 'old')
  assert (got['prompts'], got['wins'], got['ties'], got['losses'], got['unmatched']) == (39, 23, 2, 14, 1)
  assert got['rate'] == pytest.approx(24 / 39)
  ci = scipy.stats.binomtest(23, 37).proportion_ci(confidence_level=0.95, method='wilson')
  assert preference_report.wilson(23, 37) == pytest.approx((ci.low, ci.high), abs=1e-6)
  loss = preference_report.sft_loss(str(tmp_path / 'w.jsonl'))
  assert loss['loss'] == pytest.approx(-sum(r['score'] * r['num_tokens'] for r in rows) / sum(r['num_tokens'] for r in rows))


def _pipeline(workdir):
  return [sys.executable, '-m', 'train.pipeline', '--config=configs/zephyr_cpu.py:tiny=True', f'--workdir={workdir}']


def _results(workdir) -> str:
  text = (workdir / 'report.md').read_text()
  return text[text.index('## Results'):text.index('## Wall time')]


def _running(marker: str) -> bool:
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if marker.encode() in f.read():
          return True
    except OSError:
      continue
  return False


def test_zephyr_cpu_killed_in_its_dpo_stage_resumes_to_the_same_report(tmp_path, one_device_env, wait_for_checkpoint):
  """configs/zephyr_cpu.py:tiny=True end to end (every stage, each in its process) up to its pairs (--until), then
  from there twice at once: straight on, and in a copy killed (kill -9) once the DPO run saved a checkpoint, which
  takes its running stage with it; the same command rerun skips the stages done, resumes the DPO run and writes
  the same results as the straight run."""
  env = dict(one_device_env(), TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  first = subprocess.run(_pipeline(straight) + ['--until=pairs'], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert (straight / 'pairs.jsonl').exists() and not (straight / 'ddpo').exists()
  assert '[pipeline] 12 stages done' in first.stdout
  shutil.copytree(straight, killed)
  rest = subprocess.Popen(_pipeline(straight), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  victim = subprocess.Popen(_pipeline(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  wait_for_checkpoint(victim, killed / 'ddpo', 6)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  deadline = time.time() + 20
  while _running(str(killed / 'ddpo')):  # The stage dies with the pipeline (PR_SET_PDEATHSIG).
    assert time.time() < deadline, 'the DPO stage outlived its killed pipeline'
    time.sleep(0.1)
  assert not (killed / 'ddpo' / 'checkpoints' / '12').exists(), 'the DPO run finished before the kill; lengthen it'
  out = rest.communicate(timeout=600)[0]
  assert rest.returncode == 0, out[-3000:]
  assert (straight / 'report.png').stat().st_size > 10_000
  results = _results(straight)
  assert '**' in results and '| dDPO student |' in results
  rerun = subprocess.run(_pipeline(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert '[pipeline] pairs: done, skipped' in rerun.stdout and '[pipeline] teacher: done, skipped' in rerun.stdout
  assert 'resumed from' in rerun.stdout
  assert _results(killed) == results
  started, ended = preference_report.stage_times(str(killed))['ddpo'][1:]
  assert (started, ended) == (2, 1)  # the killed attempt and the one that finished
