"""``python -m bench``: memory and speed of reversible chains against eager PyTorch.

Subcommands (``python -m bench --help``):

- ``suite`` (default): peak memory and median time of one training step for a depth sweep
  and the reference models, per method (eager, checkpoint, revtriton, peers); JSON,
  Markdown and a plot of memory and step time (x eager) against depth.
  ``--build-only`` builds every model and input of the preset for every method, runs no
  step and prints a line each (a CPU dry run of a GPU script); exit 1 if any fails.
- ``kernels``: GB/s of each fused op against its unfused eager equivalent, and as a fraction
  of the device's copy bandwidth, on 2**24 to 2**28 elements, operands rotated past L2, with
  the host's time per call apart (CUDA only; ``--preset tiny``: a CPU smoke run); JSON and
  Markdown, written after every row.
- ``graphs``: a training step captured in a CUDA graph against the same step uncaptured,
  eager and reversible (CUDA only; ``--build-only`` builds the models on CPU).
- ``host``: host µs per call of each op with Triton's driver launcher stubbed (compiled for
  sm_90 on the CPU), beside torch's ``add_``; JSON and Markdown.
- ``train``: loss curves of a reversible model and its eager twin over 50 SGD steps.
- ``drift``: reconstruction error of fp32 and bf16 streams against depth.
"""
