"""Tools around training runs: launch (Cloud TPU pod launcher), convert (HF / original Mistral weights in and
out) and sample (continue a prompt); runs holds the one loader of a run's parameters that convert and sample
share.

They build on the runtime (train.cli, train.checkpoint, train.loop, ...), never on train.study nor sideways on
each other. The commands are still `python -m train.launch`, `train.convert` and `train.sample`.
"""
