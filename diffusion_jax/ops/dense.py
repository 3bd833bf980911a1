"""``flax.linen.Dense`` whose kernel-gradient program is chosen per platform; forward mode works.

The function is XLA's dot, unchanged: ``y = x @ W`` for x [..., Ci], W [Ci, Co]. Its derivative is
written as a JVP (``jax.custom_jvp``), so forward mode (``jax.jvp``, ``jax.jacfwd``) runs it as
written and reverse mode transposes it:

    dy = dx @ W + dot_general(x^T, dW, contracting axis 0 of both)        x^T = x2.T, x2 [M, Ci]

The ``dW`` term's transpose, which is what the backward pass runs, is the row-major product
``x^T @ g`` ([Ci, M] @ [M, Co]) and its residual is ``x^T`` itself. On the CPU, from
:data:`MIN_ROWS` rows M, ``x^T`` is materialised behind ``lax.optimization_barrier`` in the
forward pass, so XLA hands that product to YNNPACK and never copies ``g``; autodiff's own kernel
gradient had compiled to an Eigen dot fed by a transposed copy of ``g`` into which XLA fused
``g``'s producers (a GroupNorm backward), recomputed in transposed order. On the DDPM CIFAR-10
U-Net (its ``nin_shortcut`` and attention q/k/v/proj_out layers) this made the CPU training step
3.6% (batch 8) and 4.3% (batch 32) faster (``benchmarks/README.md``, issue 7).

Everywhere else the tangent is autodiff's ``dot_general(x, dW)``: fewer than :data:`MIN_ROWS` rows
(the time embedding's layers, a row per example), other platforms (chosen at lowering by
``lax.platform_dependent``, so a program lowered for TPU or GPU holds exactly autodiff's form),
and arrays under explicit sharding (``AxisType.Explicit``), whose plain dots over a sharded batch
would need an output sharding that autodiff's rules supply.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

MIN_ROWS = 1024  # rows M of x from which the CPU tangent takes the x^T route (not tuned)


def explicitly_sharded(*arrays: jax.Array) -> bool:
    """Whether any array's type names a mesh axis (``AxisType.Explicit``, sharding in types)."""
    for a in arrays:
        spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None) or ()
        if any(axis is not None for axis in spec):
            return True
    return False


def _dense_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., Ci] . w [Ci, Co] -> [..., Co], contracting x's last axis (``nn.Dense``'s dot)."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _rows_times(xt: jax.Array, dw: jax.Array) -> jax.Array:
    """xt [Ci, M], dw [Ci, Co] -> [M, Co] = xt^T @ dw; its transpose in dw is ``xt @ g``."""
    return lax.dot_general(xt, dw, (((0,), (0,)), ((), ())))


def _kernel_tangent_cpu(x: jax.Array, dw: jax.Array) -> jax.Array:
    """x [..., Ci], dw [Ci, Co] -> [..., Co] through x^T, materialised (the barrier keeps XLA from
    folding the transpose back into the dot, which would contract x's leading axis in Eigen)."""
    xt = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    return _rows_times(xt, dw).reshape(*x.shape[:-1], dw.shape[-1])


def _kernel_tangent(x: jax.Array, w: jax.Array, dw: jax.Array) -> jax.Array:
    """The ``x @ dW`` term of the tangent: the x^T route on the CPU where it pays, else autodiff's."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if rows < MIN_ROWS or explicitly_sharded(x, w, dw):
        return _dense_dot(x, dw)
    return lax.platform_dependent(x, dw, cpu=_kernel_tangent_cpu, default=_dense_dot)


@jax.custom_jvp
def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., Ci] @ w [Ci, Co] -> [..., Co] in their common dtype (equal dtypes required)."""
    return _dense_dot(x, w)


def _dense_matmul_jvp(primals, tangents):
    """dy = dx @ W + x @ dW, leaving out a term whose tangent is a symbolic zero."""
    x, w = primals
    dx, dw = tangents
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_dense_dot(dx, w))
    if not isinstance(dw, SymbolicZero):
        terms.append(_kernel_tangent(x, w, dw))
    y = _dense_dot(x, w)
    if not terms:  # both symbolic zeros: JAX does not ask for that, but the contract allows it
        return y, jnp.zeros_like(y)
    return y, sum(terms[1:], terms[0])


dense_matmul.defjvp(_dense_matmul_jvp, symbolic_zeros=True)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.dot_general`` (same values) whose Dense contraction goes through :func:`dense_matmul`.

    ``x [..., Ci] . W [Ci, Co]`` over x's last axis (what ``nn.Dense`` asks for) with equal dtypes
    and default precision takes the platform-chosen tangent; anything else is ``lax.dot_general``.
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
    return dense_matmul(lhs, rhs)


def Dense(*args: Any, **kwargs: Any) -> nn.Dense:  # noqa: N802
    """``flax.linen.Dense`` using :func:`dot_general`: the same parameters, outputs and gradients."""
    return nn.Dense(*args, dot_general=dot_general, **kwargs)
