"""A drop-in ``dot_general`` for ``flax.linen.Dense`` whose kernel gradient is faster on the CPU.

The function computed is XLA's dot, unchanged; only the kernel-gradient program differs, and only
when the program runs on a CPU. For ``y = x @ W`` (x [..., Ci], W [Ci, Co]) autodiff's kernel
gradient contracts x and the cotangent g over their leading axes. XLA's CPU backend compiled it to
an Eigen dot fed by a transposed copy of ``g``, and fused ``g``'s producers (a GroupNorm backward)
into that copy, recomputing them in transposed order. Here the gradient is ``x^T @ g`` on the 2-D
views, with ``x^T`` (the saved input) materialised behind an optimization barrier, so the product
is a row-major ``[Ci, M] @ [M, Co]`` that XLA hands to YNNPACK and ``g`` is never copied. On the
DDPM CIFAR-10 U-Net (its ``nin_shortcut`` and attention q/k/v/proj_out layers) the training step
got 3.6% (batch 8) and 4.3% (batch 32) faster against autodiff's (``benchmarks/README.md``, issue
7). It is used from :data:`MIN_ROWS` rows (M); the time embedding's layers (a row per example)
get autodiff's gradient, as do other backends (GPU, TPU) at any size, chosen at lowering by
``lax.platform_dependent``, and arrays under explicit sharding (``AxisType.Explicit``), whose
output sharding autodiff's rule knows.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models.layers import explicitly_sharded

MIN_ROWS = 1024  # rows M of x from which the CPU kernel gradient takes the x^T route (not tuned)


def _transposed_x_kernel_grad(x2: jax.Array, g2: jax.Array) -> jax.Array:
    # The barrier keeps x^T a materialised array: without it XLA folds the transpose back into
    # the dot and contracts x's leading axis in Eigen (no copy of g either; as fast at batch 32,
    # ~2% slower at batch 8, within that measurement's noise).
    return jnp.dot(lax.optimization_barrier(x2.T), g2)


def _dense_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dense_dot(x, w)


def _matmul_fwd(x, w):
    return _dense_dot(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if rows < MIN_ROWS or explicitly_sharded(x, w, g):
        return jax.vjp(_dense_dot, x, w)[1](g)  # autodiff's own
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))  # g @ W^T, as autodiff's

    def autodiff_kernel_grad(x, g):
        return jax.vjp(lambda w: _dense_dot(x, w), w)[1](g)[0]

    def cpu_kernel_grad(x, g):
        return _transposed_x_kernel_grad(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))

    dw = lax.platform_dependent(x, g, cpu=cpu_kernel_grad, default=autodiff_kernel_grad)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.dot_general`` (same values) with a faster CPU kernel gradient for Dense's contraction.

    Takes the custom gradient for ``x [..., Ci] . W [Ci, Co]`` over x's last axis (what
    ``nn.Dense`` asks for) with equal dtypes and default precision; anything else goes to
    ``lax.dot_general`` as is.
    """
    dense_dims = (((lhs.ndim - 1,), (0,)), ((), ()))
    plain = (
        rhs.ndim != 2
        or lhs.ndim < 1
        or lhs.dtype != rhs.dtype
        or precision is not None
        or preferred_element_type is not None
        or kwargs
    )
    dims = tuple(tuple(tuple(int(d) for d in ax) for ax in pair) for pair in dimension_numbers)
    if plain or dims != dense_dims:
        return lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )
    return _matmul(lhs, rhs)


def Dense(*args: Any, custom_grads: bool = True, **kwargs: Any) -> nn.Dense:  # noqa: N802
    """``flax.linen.Dense`` using :func:`dot_general`: the same parameters and outputs.

    ``custom_grads=False`` gives the plain ``nn.Dense``, which forward-mode autodiff (``jax.jvp``)
    can go through; the custom-VJP product cannot.
    """
    if not custom_grads:
        return nn.Dense(*args, **kwargs)
    return nn.Dense(*args, dot_general=dot_general, **kwargs)
