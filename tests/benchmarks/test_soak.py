"""The short version of benchmarks/soak.py that CI runs: a few kill -9s, one of each kind, then bitwise equal."""
from benchmarks import soak


def test_killed_at_start_up_during_a_save_and_mid_run_resumes_bitwise(digits_dir, tmp_path):
  lines = []
  out = soak.soak(str(tmp_path / 'soak'), kills=3, seed=0, total_steps=60, data_dir=digits_dir, log=lines.append)
  assert out.kills == {'start-up': 1, 'save': 1, 'step': 1}, lines
  assert out.equal, out.difference
  assert out.restarts == 4
