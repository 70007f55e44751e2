"""benchmarks.long_context on two virtual devices at short rows: the table, the halo, the longest-row search."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_prints_memory_halo_and_the_longest_row():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.long_context', '--lengths=1024', '--sequence=1,2',
                         '--time_lengths=1024', '--steps=1', '--budget_gib=0.75', '--max_length=1024'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {int(m[0]): m for m in re.findall(r'^ +1,024 +(\d) +([\d.]+) G +([\d.]+) G +([\d.]+) G +[\d.]+x +(\S+) '
                                           r'+[\d.]+ s +([\d.]+) s$', proc.stdout, re.M)}
  assert set(rows) == {1, 2}, proc.stdout
  assert rows[1][4] == '-' and rows[2][4] == '255'  # no halo on one device; W - 1 keys over two
  assert float(rows[2][1]) < float(rows[1][1])       # half the row: fewer temporaries
  assert re.search(r'^sequence=1: [\d,]+ tokens', proc.stdout, re.M), proc.stdout
  assert re.search(r'^sequence=2: [\d,]+ tokens', proc.stdout, re.M), proc.stdout
