"""`python -m train.launch`, and the import path train.launch: the code lives in train/tools/launch.py.

An entry point kept where the command always was: it re-exports train.tools.launch's public names (plan,
parse_args, check, restart_loop, ...) and load_config and PREEMPTED_EXIT, now in train/cli.py, and runs its
main. Patch train.tools.launch (or train.cli), not this module: the code looks its names up there.
"""
from train.cli import PREEMPTED_EXIT, load_config  # noqa: F401
from train.tools.launch import *  # noqa: F401,F403

if __name__ == '__main__':
  import sys
  from train.tools import launch
  sys.exit(launch.main())
