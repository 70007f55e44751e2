"""train.study.prewarm: a sweep's later train steps compiled ahead into the persistent cache, which the runs hit."""
import json
import os
import subprocess
import sys

from train import cli
from train.study import prewarm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = os.path.join(REPO, 'configs/convnets_at_scale_cpu.py')


def _config(arg, *overrides):
  return cli.load_config(f'{CONFIG}:{arg}', [f'--config.{o}' for o in overrides])


def test_program_key_ignores_what_only_feeds_the_step():
  """Runs of one model at other budgets and learning rates share a program; another model, image size or seed
  does not."""
  key = prewarm.program_key(_config('model=vit-XS,epochs=1,lr=0.01'))
  assert prewarm.program_key(_config('model=vit-XS,epochs=4,lr=0.02')) == key
  assert prewarm.program_key(_config('model=vit-S,epochs=1,lr=0.01')) != key
  assert prewarm.program_key(_config('model=vit-XS,epochs=1,lr=0.01', 'seed=1')) != key
  assert prewarm.program_key(_config('model=vit-XS,epochs=1,lr=0.01', 'batch_size=32')) != key


def test_a_run_hits_the_programs_the_prewarm_compiled(tmp_path, digits_dir):
  """The background process's compiles (train.memory's abstract arguments; the eval batch shapes from the
  data) lower to the run's own modules: the run, at another learning rate and budget, finds its train step,
  eval step and seeded init in the cache instead of compiling them."""
  cache = tmp_path / 'cache'
  (cache / prewarm.MARKERS).mkdir(parents=True)
  plan = cache / prewarm.MARKERS / 'plan.json'
  plan.write_text(json.dumps([[f'{CONFIG}:model=vit-XS,epochs=1,lr=0.01', [f'data.data_dir={digits_dir}']]]))
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1', JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  out = subprocess.run([sys.executable, '-m', 'train.study.prewarm', f'--plan={plan}'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'compiled in' in out.stdout, out.stdout
  config = _config('model=vit-XS,epochs=1,lr=0.01', f'data.data_dir={digits_dir}')
  assert os.path.exists(cache / prewarm.MARKERS / f'{prewarm.program_key(config)}.done')
  entries = {p for p in os.listdir(cache) if p.startswith('jit_train_step-')}
  assert len(entries) == 1

  run = subprocess.run([sys.executable, '-m', 'train', f'--config={CONFIG}:model=vit-XS,epochs=0.1,lr=0.02',
                        f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={digits_dir}'],
                       cwd=REPO, env=dict(env, JAX_LOG_COMPILES='1'), capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  for program in ('jit_train_step', 'jit_eval_step', 'jit__lambda'):  # the step, evaluation, the seeded init
    assert f"Persistent compilation cache hit for '{program}'" in run.stderr, program
  assert {p for p in os.listdir(cache) if p.startswith('jit_train_step-')} == entries
