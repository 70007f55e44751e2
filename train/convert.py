"""`python -m train.convert`, and the import path train.convert: the code lives in train/tools/convert.py.

An entry point kept where the command always was: it re-exports train.tools.convert's public names
(import_model, export_model, load_params, ...) and runs its main with its flags. Patch train.tools.convert
(or train.tools.loader for the loading), not this module: the code looks its names up there.
"""
from train.tools.convert import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.tools import convert
  cli.run(convert)
