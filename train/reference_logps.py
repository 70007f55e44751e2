"""`python -m train.reference_logps`: the code lives in train/tools/reference_logps.py (this shim only runs it)."""
from train.tools.reference_logps import *  # noqa: F401,F403

if __name__ == '__main__':
  from train import cli
  from train.tools import reference_logps
  cli.run(reference_logps)
