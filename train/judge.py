"""`python -m train.judge`, and the import path train.judge: the code lives in train/tools/judge.py.

An entry point beside train.sample's: it re-exports train.tools.judge's public names and runs its main with its
flags. Patch train.tools.judge, not this module: the code looks its names up there.
"""
from train.tools.judge import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.tools import judge
  cli.run(judge)
