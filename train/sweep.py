"""`python -m train.sweep`, and the import path train.sweep: the code lives in train/study/sweep.py.

An entry point kept where the command always was: it re-exports train.study.sweep's public names (plan,
finished, table, train_all, report, Run, ...) and runs its main with its flags. Patch train.study.sweep, not
this module: the code looks its names up there.
"""
from train.study.sweep import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.study import sweep
  cli.run(sweep)
