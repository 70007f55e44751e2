"""The import path train.scaling (no command): the code lives in train/study/scaling.py and train/study/report.py.

Kept where the module always was: it re-exports train.study.scaling's public names (fit_power_law, frontier,
analyze, Run, ...) and the report's markdown and plot. Patch train.study.scaling or train.study.report, not
this module.
"""
from train.study.report import markdown, plot  # noqa: F401
from train.study.scaling import *  # noqa: F401,F403
