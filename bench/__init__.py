"""``python -m bench``: memory and speed of reversible chains against eager PyTorch.

Subcommands (``python -m bench --help``):

- ``suite`` (default): peak memory and median time of one training step for a depth sweep
  and the reference models, per method (eager, checkpoint, revtriton, peers).
- ``kernels``: GB/s of each fused kernel and its unfused eager equivalent (CUDA only).
- ``train``: loss curves of a reversible model and its eager twin over 50 SGD steps.
- ``drift``: reconstruction error of fp32 and bf16 streams against depth.
"""
