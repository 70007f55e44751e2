"""`python -m train.generate`, and the import path train.generate: the code lives in train/tools/generate.py.

An entry point beside train.sample's: it re-exports train.tools.generate's public names and runs its main with
its flags. Patch train.tools.generate, not this module: the code looks its names up there.
"""
from train.tools.generate import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.tools import generate
  cli.run(generate)
