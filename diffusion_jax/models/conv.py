"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is faster on the CPU.

The function computed is XLA's convolution, unchanged; only the kernel-gradient program differs,
and only when the program runs on a CPU. There XLA's weight-gradient convolution over a large
window (the whole 32x32 feature map of a batch) ran at 84-116 GFLOP/s on the project's AVX-512
box, against 164-224 GFLOP/s for the same gradient written as one matmul per kernel tap,
``dw[i, j] = (g^T @ x_pad[:, i:i+H, j:j+W])^T`` (``benchmarks/README.md``, issue 7). The tap form is
used for stride-1 convolutions whose gradient has at least :data:`TAP_MIN_ROWS` output positions
(batch * H * W); below that XLA's own was as fast or faster. It is used only where XLA would run
its kernel-gradient convolution on YNNPACK (jax 0.10's default): with convolutions on XLA's Eigen
kernels (``diffusion_jax.env.CPU_XLA_FLAGS``) XLA's own gradient ran 1.2-1.8x faster than the
taps, so :func:`xla_kernel_grad_on_ynnpack` asks the compiler once per process. Other backends
(GPU, TPU) always take XLA's gradient, chosen at lowering by ``lax.platform_dependent``, so a
program lowered for several platforms stays right on each.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models.layers import explicitly_sharded

TAP_MIN_ROWS = 8192  # batch * H_out * W_out from which the per-tap matmuls beat XLA's (CPU)
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax specs of NHWC / HWIO / NHWC

Padding = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pad: Padding) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _kernel_grad_taps(
    x: jax.Array, g: jax.Array, w_shape: Sequence[int], pad: Padding
) -> jax.Array:
    """Stride-1 d(conv)/d(w), a matmul per tap: x [B,H,W,Ci], g [B,Ho,Wo,Co] -> [kh,kw,Ci,Co]."""
    kh, kw, ci, co = w_shape
    _, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    size = (xp.shape[0], ho, wo, ci)

    # g^T once, materialised (the barrier stops XLA folding the transpose back into the dot), so
    # each tap is a row-major [Co, N] @ [N, Ci] product, which XLA hands to YNNPACK; the
    # transposed form window^T @ g went to Eigen's slower contraction with operand packing.
    gt = lax.optimization_barrier(g.reshape(-1, co).T)

    def tap(k, dw):  # a loop, not nine independent slices: one shifted window lives at a time
        i, j = k // kw, k % kw
        window = lax.dynamic_slice(xp, (0, i, j, 0), size)
        d = jnp.dot(gt, window.reshape(-1, ci), preferred_element_type=jnp.float32)
        return dw.at[k].set(d)

    dw = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, co, ci), jnp.float32))
    return dw.transpose(0, 2, 1).reshape(kh, kw, ci, co)


def _ynn_fused_convolutions(hlo: str) -> int:
    """How many convolutions of an optimised HLO text sit inside YNNPACK fusions."""
    bodies = dict(re.findall(r"^%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
    called = re.findall(r"ynn_fusion[.0-9]* = .*?calls=%?([\w.-]+)", hlo)
    return sum(" convolution(" in bodies.get(c, "") for c in called)


@functools.cache
def xla_kernel_grad_on_ynnpack() -> bool:
    """Whether the CPU backend compiles XLA's 3x3 kernel-gradient convolution into YNNPACK.

    That gradient then ran at 67-103 GFLOP/s against 150-205 for the taps; on XLA's Eigen kernels
    it ran at 200-260. Decided once per process by compiling a small gradient (XLA_FLAGS and the
    jaxlib version, which set it, are fixed by then).
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend: the tap branch is never taken
        return False
    sharding = jax.sharding.SingleDeviceSharding(cpu)
    x = jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32, sharding=sharding)
    g = jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32, sharding=sharding)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32, sharding=sharding)
    pad = ((1, 1), (1, 1))

    def kernel_grad(x, w, g):
        return jax.vjp(lambda w: _xla_conv(x, w, (1, 1), pad), w)[1](g)[0]

    try:
        hlo = jax.jit(kernel_grad).lower(x, w, g).compile().as_text()
    except Exception:  # noqa: BLE001  (the taps are only a speed-up: never fail a program here)
        return False
    return _ynn_fused_convolutions(hlo) > 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pad: Padding) -> jax.Array:
    return _xla_conv(x, w, strides, pad)


def _conv_fwd(x, w, strides, pad):
    return _xla_conv(x, w, strides, pad), (x, w)


def _conv_bwd(strides, pad, res, g):
    x, w = res
    dx = jax.vjp(lambda x: _xla_conv(x, w, strides, pad), x)[1](g)[0]

    def xla_kernel_grad(x, g):
        return jax.vjp(lambda w: _xla_conv(x, w, strides, pad), w)[1](g)[0]

    few_rows = g.shape[0] * g.shape[1] * g.shape[2] < TAP_MIN_ROWS
    plain = strides != (1, 1) or few_rows or explicitly_sharded(x, w, g)
    if plain or not xla_kernel_grad_on_ynnpack():
        return dx, xla_kernel_grad(x, g)
    dw = lax.platform_dependent(
        x,
        g,
        cpu=lambda x, g: _kernel_grad_taps(x, g, w.shape, pad).astype(w.dtype),
        default=xla_kernel_grad,
    )
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` (same signature and values) with a faster CPU kernel gradient.

    Takes the custom gradient for 2-D NHWC/HWIO convolutions without dilation or groups, explicit
    padding or 'SAME'/'VALID'; anything else goes to ``lax.conv_general_dilated`` as is.
    """
    plain = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype:
        return plain()
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != _NHWC:
        return plain()
    no_dilation = all(tuple(d or (1, 1)) == (1, 1) for d in (lhs_dilation, rhs_dilation))
    if not no_dilation or feature_group_count != 1 or batch_group_count != 1:
        return plain()
    if precision is not None or preferred_element_type is not None:
        return plain()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pad = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv(lhs, rhs, strides, pad)


def Conv(*args: Any, custom_grads: bool = True, **kwargs: Any) -> nn.Conv:  # noqa: N802
    """``flax.linen.Conv`` using :func:`conv_general_dilated`: the same parameters and outputs.

    ``custom_grads=False`` gives the plain ``nn.Conv``, which forward-mode autodiff (``jax.jvp``)
    can go through; the custom-VJP convolution cannot.
    """
    if not custom_grads:
        return nn.Conv(*args, **kwargs)
    return nn.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)
