"""Pieces shared by the denoisers: the DDPM timestep embedding, initialisers and input checks.

``t`` counts from 0 (0 = the paper's t = 1, least noisy); the networks only embed its value, so
integer and float timesteps (e.g. respaced or continuous) both work.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def timestep_embedding(t: ArrayLike, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps ``t`` [B] -> float32 [B, dim] (DDPM ``get_timestep_embedding``).

    With ``half = dim // 2`` the frequencies are ``exp(-log(max_period) * k / (half - 1))`` for
    k = 0..half-1, and the embedding is ``[sin(t * freqs), cos(t * freqs)]``, zero-padded by one
    column when ``dim`` is odd (Ho et al. 2020, after Vaswani et al. 2017 section 3.5).
    """
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(
            f"timesteps t must have shape [B], got shape {t.shape}; pass one per example."
        )
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be at least 4 (two frequencies), got {dim}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM's initialiser: variance scaling, fan-average, uniform; ``scale = 0`` gives zeros."""
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def check_timesteps(t: ArrayLike, batch: int) -> jax.Array:
    """``t`` as an array of shape [batch], or a ValueError naming the mismatch."""
    t = jnp.asarray(t)
    if t.shape != (batch,):
        raise ValueError(
            f"timesteps t must have shape [B] = ({batch},) to match the batch of x, got {t.shape}; "
            "pass one timestep per example, e.g. jnp.full((B,), t)."
        )
    return t


def labels_or_null(y: ArrayLike | None, batch: int, num_classes: int | None) -> jax.Array | None:
    """Class labels int32 [batch] for a model with ``num_classes`` classes, or None if unconditional.

    Label ``num_classes`` is the null class (classifier-free guidance); ``y = None`` on a
    class-conditional model means the null class for every example.
    """
    if num_classes is None:
        if y is not None:
            raise ValueError(
                "class labels y were given but the model is unconditional; "
                "set num_classes to build a class-conditional model, or pass y=None."
            )
        return None
    if y is None:
        return jnp.full((batch,), num_classes, dtype=jnp.int32)
    y = jnp.asarray(y)
    if y.shape != (batch,):
        raise ValueError(
            f"class labels y must have shape [B] = ({batch},) to match the batch of x, got {y.shape}."
        )
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"class labels y must be integers, got dtype {y.dtype}.")
    if not isinstance(y, jax.core.Tracer):  # concrete labels: check their range now
        values = np.asarray(y)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"class labels y must lie in [0, {num_classes}] ({num_classes} is the null class), "
                f"got values in [{lo}, {hi}]."
            )
    return y.astype(jnp.int32)


def check_images(x: ArrayLike) -> jax.Array:
    """``x`` as an array after checking it is a 4-D NHWC batch [B, H, W, C] (the image models' input)."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"x must be a 4-D NHWC batch [B, H, W, C], got shape {x.shape}; "
            "add a batch axis with x[None] or a channel axis with x[..., None]."
        )
    return x


def with_self_condition(
    x: jax.Array, x_self_cond: ArrayLike | None, self_condition: bool
) -> jax.Array:
    """The input of a self-conditioned network (Chen, Zhang & Hinton 2022, "Analog Bits", Alg. 1):
    x [B, ..., C] -> [B, ..., 2C], the previous x_0 estimate ``x_self_cond`` (zeros when None)
    concatenated on the last axis. A model without ``self_condition`` gets ``x`` back unchanged, and
    a ValueError if given an estimate."""
    if not self_condition:
        if x_self_cond is not None:
            raise ValueError(
                "x_self_cond was given to a model built without self-conditioning; build it with "
                "self_condition=True (config key model.self_condition) or pass x_self_cond=None."
            )
        return x
    if x_self_cond is None:
        return jnp.concatenate([x, jnp.zeros_like(x)], axis=-1)
    x_self_cond = jnp.asarray(x_self_cond)
    if x_self_cond.shape != x.shape:
        raise ValueError(
            f"x_self_cond must have the shape of x, {x.shape} (an x_0 estimate), got "
            f"{x_self_cond.shape}."
        )
    return jnp.concatenate([x, x_self_cond.astype(x.dtype)], axis=-1)
