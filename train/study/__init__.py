"""The compute-budget study: sweep (expand a sweep config into runs and train them), analyze (read the runs'
workdirs, write the report and figure) and scaling (frontiers, power-law fits, compute-optimal allocation).

It builds on the runtime (train.compute, train.loop, train.cli, ...) and never on train.tools. The commands
are still `python -m train.sweep` and `python -m train.analyze` (train/sweep.py, train/analyze.py).
"""
