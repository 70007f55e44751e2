"""train.sample: samples by default (temperature 0.8, top-p 0.95); bad options and a workdir of a model that
writes no text end with one line and exit 2."""
import os
import subprocess
import sys

import pytest

from data import tokenizers
from train import loop
from train.tools import loader, sample

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _sample(*args):
  return subprocess.run([sys.executable, '-m', 'train.sample', *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=180)


@pytest.mark.parametrize('options, message', [
    ((0, 0.8, None, 0.95), '--max_new_tokens=0: generate at least 1 token.'),
    ((-3, 0.8, None, 0.95), '--max_new_tokens=-3: generate at least 1 token.'),
    ((5, -0.5, None, 0.95), '--temperature=-0.5 must be >= 0 (0 for greedy decoding).'),
    ((5, float('nan'), None, 0.95), '--temperature=nan must be >= 0'),
    ((5, 0.8, 0, 0.95), '--top_k=0 must be at least 1'),
    ((5, 0.8, None, 0.0), '--top_p=0.0 must be in (0, 1]'),
    ((5, 0.8, None, 1.5), '--top_p=1.5 must be in (0, 1]'),
])
def test_sampling_options_out_of_range_are_refused(options, message):
  with pytest.raises(ValueError) as e:
    sample.check_options(*options)
  assert str(e.value).startswith(message)


def test_sampling_options_in_range_pass():
  sample.check_options(1, 0.0, None, None)
  sample.check_options(5, 0.8, 1, 1.0)


@pytest.fixture(scope='module')
def vit_workdir(digits_dir, tmp_path_factory, tiny_config):
  workdir = str(tmp_path_factory.mktemp('vit'))
  loop.train(tiny_config(digits_dir, total_steps=1, checkpoint_every_steps=1, **{'schedule.warmup_steps': 0}),
             workdir)
  return workdir


@pytest.mark.parametrize('flag, line', [  # The other options' checks share check_options, tested above.
    ('--temperature=-1', 'error: --temperature=-1.0 must be >= 0 (0 for greedy decoding).'),
    ('', "error: {workdir} holds a 'vit' model, which does not generate text; point --workdir at a language "
         "model's workdir (e.g. one of configs/mistral_tiny.py)."),
])
def test_bad_options_and_a_vision_workdir_end_with_one_line(vit_workdir, flag, line):
  proc = _sample(f'--workdir={vit_workdir}', *filter(None, [flag]))
  assert (proc.returncode, proc.stderr.splitlines()) == (2, [line.format(workdir=vit_workdir)]), proc.stderr


def test_the_command_samples_by_default(tmp_path, tiny_mistral_config):
  """Its output is the sample at temperature 0.8 and top-p 0.95 with seed 0 (which a 1-step model's near-uniform
  next-token distribution makes differ from the greedy continuation)."""
  c = tiny_mistral_config
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1, 0, 1
  c.schedule.warmup_steps, c.eval_at_start = 0, False
  workdir = str(tmp_path / 'lm')
  loop.train(c, workdir)
  proc = _sample(f'--workdir={workdir}', '--prompt=the quick', '--max_new_tokens=24')
  assert proc.returncode == 0, proc.stderr
  config, module = sample.language_model(workdir)
  sampled = sample.continuation(loader.load_run(workdir), module, tokenizers.get_tokenizer(config.data.tokenizer),
                                'the quick', 24, temperature=0.8, top_p=0.95, seed=0)
  assert proc.stdout == f'the quick{sampled}\n'
