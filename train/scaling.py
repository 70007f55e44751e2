"""The import path train.scaling (no command): the code lives in train/study/scaling.py.

Kept where the module always was: it re-exports train.study.scaling's public names (fit_power_law, frontier,
analyze, markdown, plot, Run, ...). Patch train.study.scaling, not this module.
"""
from train.study.scaling import *  # noqa: F401,F403
