"""`python -m train.analyze`, and the import path train.analyze: the code lives in train/study/analyze.py.

An entry point kept where the command always was: it re-exports train.study.analyze's public names
(write_report, load_runs, read_run, StudyError, ...) and runs its main with its flags. Patch
train.study.analyze, not this module: the code looks its names up there.
"""
from train.study.analyze import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.study import analyze
  cli.run(analyze)
