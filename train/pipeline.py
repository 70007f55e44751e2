"""`python -m train.pipeline`, and the import path train.pipeline: the code lives in train/study/pipeline.py.

An entry point beside the other commands: it re-exports train.study.pipeline's public names and runs its main with
its flags. Patch train.study.pipeline, not this module.
"""
from train.study.pipeline import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.study import pipeline
  cli.run(pipeline)
