"""GroupNorm, optionally followed by swish, with a hand-written backward pass.

The values are ``flax.linen.GroupNorm``'s (statistics over H, W and the channels of a group, the
variance as E[x^2] - E[x]^2, computed in float32) and the parameters are the same ``scale`` and
``bias``, so checkpoints carry over. Only the gradient program differs: autodiff of the textbook
form keeps ``x - mean``, the normalised tensor and the sigmoid of the swish as residuals, each a
full activation written in the forward pass and read back; here the backward pass keeps ``x`` and
the per-group statistics, recomputes the rest in the same elementwise passes that use it, and
gets every reduction it needs from two per-(example, channel) sums:

    dy = dout * swish'(y)              (dy = dout without the swish), y = xhat * scale + bias
    S1[b, c] = sum_hw dy,  S2[b, c] = sum_hw dy * xhat
    dbias = sum_b S1,  dscale = sum_b S2
    dx = rstd * (dy * scale - mean_group(scale * S1) - xhat * mean_group(scale * S2))

On the project's CPU box this cut the batch-32 training step's XLA temporaries from 2.45 to 1.73 GiB
and its time by 1-3% (issue 7, ``benchmarks/README.md``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _stats(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-(example, group) mean and 1/sqrt(var + eps) of float32 x [B, ..., C] -> two [B, G]."""
    b, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    s1 = jnp.sum(x, axis=axes).reshape(b, groups, c // groups)
    s2 = jnp.sum(x * x, axis=axes).reshape(b, groups, c // groups)
    n = x.size // (b * groups)
    mean = jnp.sum(s1, -1) / n
    var = jnp.maximum(jnp.sum(s2, -1) / n - mean * mean, 0.0)
    return mean, jax.lax.rsqrt(var + eps)


def _per_channel(v: jax.Array, c: int, ndim: int) -> jax.Array:
    """[B, G] -> [B, 1, ..., 1, C] (each group's value repeated over its channels)."""
    b, g = v.shape
    v = jnp.repeat(v, c // g, axis=1)
    return v.reshape((b,) + (1,) * (ndim - 2) + (c,))


def _affine(x, scale, bias, mean, rstd):
    """x * a + d with a = rstd * scale, d = bias - mean * a, per (example, channel)."""
    c = x.shape[-1]
    a = _per_channel(rstd, c, x.ndim) * scale
    d = bias - _per_channel(mean, c, x.ndim) * a
    return a, d


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float, swish: bool
) -> jax.Array:
    """GroupNorm of x [B, ..., C] with ``groups`` groups, then swish if asked: float32 [B, ..., C].

    Computed in float32 whatever x's dtype (scale and bias float32); x's gradient comes back in
    x's dtype, and x is what the backward pass keeps (so bfloat16 activations stay bfloat16).
    """
    return _fwd(x, scale, bias, groups, eps, swish)[0]


def _fwd(x, scale, bias, groups, eps, swish):
    xf = x.astype(jnp.float32)
    mean, rstd = _stats(xf, groups, eps)
    a, d = _affine(xf, scale, bias, mean, rstd)
    y = xf * a + d
    out = y * jax.nn.sigmoid(y) if swish else y
    return out, (x, scale, bias, mean, rstd)


def _bwd(groups, eps, swish, res, dout):
    x_in, scale, bias, mean, rstd = res
    x = x_in.astype(jnp.float32)
    b, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    r = _per_channel(rstd, c, x.ndim)
    xhat = (x - _per_channel(mean, c, x.ndim)) * r
    if swish:
        y = xhat * scale + bias
        s = jax.nn.sigmoid(y)
        dy = dout * (s * (1 + y * (1 - s)))
    else:
        dy = dout
    s1 = jnp.sum(dy, axis=axes)  # [B, C]
    s2 = jnp.sum(dy * xhat, axis=axes)
    n = x.size // (b * groups)
    m1 = jnp.sum((s1 * scale).reshape(b, groups, -1), -1) / n  # [B, G]: mean_group(dy * scale)
    m2 = jnp.sum((s2 * scale).reshape(b, groups, -1), -1) / n  # mean_group(dy * scale * xhat)
    m1, m2 = _per_channel(m1, c, x.ndim), _per_channel(m2, c, x.ndim)
    dx = r * (dy * scale - m1 - xhat * m2)
    return (
        dx.astype(x_in.dtype),
        jnp.sum(s2, 0).astype(scale.dtype),
        jnp.sum(s1, 0).astype(bias.dtype),
    )


group_norm.defvjp(_fwd, _bwd)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(num_groups, epsilon)`` (same params) computed in float32, then swish if ``swish``.

    x [B, ..., C] -> [B, ..., C] in x's dtype; C must divide into ``num_groups`` groups.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    swish: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(
                f"GroupNorm: {c} channels do not split into {self.num_groups} groups; "
                "use a channel count divisible by the number of groups."
            )
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        f32 = jnp.float32
        out = group_norm(
            x, scale.astype(f32), bias.astype(f32), self.num_groups, self.epsilon, self.swish
        )
        return out.astype(x.dtype)
