"""Platform-specific kernels and gradients, chosen by platform, never by model code.

Models call one layer from here and the platform decides how it is differentiated; every layer
supports both reverse mode (``jax.grad``) and forward mode (``jax.jvp``, ``jax.jacfwd``) on every
platform, so consistency-style training can take directional derivatives through the net.

- :func:`Conv` is ``flax.linen.Conv``, XLA's own gradient on every platform. A hand-written CPU
  kernel gradient (one matmul per kernel tap) was dropped: with ``diffusion_jax.env.CPU_XLA_FLAGS``
  (convolutions on XLA's Eigen kernels) XLA's own ran 1.2-1.8x faster (``benchmarks/README.md``).
- :func:`Dense` is ``flax.linen.Dense`` whose kernel tangent takes a materialised ``x^T`` on the
  CPU (a row-major ``x^T @ g`` kernel gradient in reverse mode) and autodiff's form elsewhere
  (``dense.py``).
- :class:`GroupNorm` (+ swish) in float32, recomputed from its inputs in the backward pass
  (``jax.checkpoint``), which keeps only x and the parameters as residuals (``norm.py``).
"""

import flax.linen as nn

from diffusion_jax.ops.dense import Dense, dense_matmul
from diffusion_jax.ops.norm import GroupNorm, group_norm

Conv = nn.Conv  # XLA's convolution and gradient on every platform (see the module docstring)

__all__ = ["Conv", "Dense", "GroupNorm", "dense_matmul", "group_norm"]
