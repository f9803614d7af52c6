"""The precisions a model runs in: fp32, or bf16 / fp16 autocast (CUDA only; CPU runs fp32).

No torch here, so the training config and the CLI can name them without importing it.
"""

PRECISIONS = ("fp32", "bf16", "fp16")
