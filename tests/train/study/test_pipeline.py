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
  assert ddpo[1:4] == ['-m', 'train', f'--config={ROOT}/configs/zephyr_cpu.py:tiny=True,reference=frozen,stage=ddpo']
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
