"""`python -m train.sample`, and the import path train.sample: the code lives in train/tools/sample.py.

An entry point kept where the command always was: it re-exports train.tools.sample's public names and
load, now train/tools/loader.py's (convert shares it), and runs sample's main with its flags. Patch
train.tools.sample or train.tools.loader, not this module: the code looks its names up there.
"""
from train.tools.loader import load  # noqa: F401
from train.tools.sample import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.tools import sample
  cli.run(sample)
