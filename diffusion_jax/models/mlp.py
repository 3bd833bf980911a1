"""A residual MLP denoiser for points [B, D] (2-D toy data such as Datasaurus), after tiny-diffusion.

The input is ``gelu(Dense(hidden)(concat[features(x), time embedding, class embedding]))``, then
``num_layers`` residual blocks ``h + gelu(Dense(h))`` and a Dense to the output. ``t`` is [B]
the process's network time (:meth:`Process.model_time`: DDPM's 0-based step, 1000 t for flow,
250 ln sigma for EDM); the net only embeds its value.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffusion_jax.models.layers import (
    check_timesteps,
    labels_or_null,
    timestep_embedding,
    with_self_condition,
)
from diffusion_jax.ops import Dense

Dtype = Any
TIME_EMBEDDINGS = ("sinusoidal", "learned", "none")


def fourier_features(x: jax.Array, num_freqs: int, scale: float) -> jax.Array:
    """Fixed sinusoidal input features: x [B, D] -> float32 [B, D * 2 * num_freqs].

    Per input dim, ``[sin(scale * x * f_k), cos(scale * x * f_k)]`` with geometric frequencies
    f_k from 1 down to 1e-4 (the tiny-diffusion input embedding); nothing here is trained.
    """
    freqs = jnp.asarray(scale * np.geomspace(1.0, 1e-4, num_freqs), dtype=jnp.float32)
    args = x.astype(jnp.float32)[:, :, None] * freqs  # [B, D, F]
    feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, D, 2F]
    return feats.reshape(x.shape[0], -1)


class MLPDenoiser(nn.Module):
    """Residual MLP ``(x [B, D], t [B], y [B] | None) -> float32 [B, D]`` ([B, 2D] if ``learn_sigma``).

    ``time_embedding``: "sinusoidal" (the DDPM embedding of t, ``hidden`` wide), "learned" (that
    embedding through a trained Dense-SiLU-Dense, as in the U-Net) or "none" (the output ignores t).
    ``fourier_features`` > 0 replaces raw x by that many fixed sin/cos frequencies per input dim,
    scaled by ``fourier_scale``. ``num_classes`` adds a label embedding; label ``num_classes`` is
    the null class and ``y = None`` means it for every example. ``self_condition`` (Analog Bits
    self-conditioning) appends the previous x_0 estimate ``x_self_cond`` [B, D] (zeros when None)
    to x, before the Fourier features.
    """

    hidden: int = 128
    num_layers: int = 3
    time_embedding: str = "sinusoidal"
    fourier_features: int = 0
    fourier_scale: float = 25.0
    num_classes: int | None = None
    learn_sigma: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    self_condition: bool = False

    def _check_config(self) -> None:
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"time_embedding must be one of {TIME_EMBEDDINGS}, got {self.time_embedding!r}."
            )
        if self.hidden < 4:
            raise ValueError(
                f"hidden must be >= 4 (it is also the time embedding width), got {self.hidden}."
            )
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}.")
        if self.fourier_features < 0:
            raise ValueError(
                f"fourier_features must be >= 0 (0 = raw input), got {self.fourier_features}."
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

    @nn.compact
    def __call__(
        self,
        x: ArrayLike,
        t: ArrayLike,
        y: ArrayLike | None = None,
        *,
        train: bool = False,
        x_self_cond: ArrayLike | None = None,
    ) -> jax.Array:
        """Predict from points x [B, D] at timesteps t [B] (labels y [B]; with ``self_condition``,
        the x_0 estimate x_self_cond [B, D]) -> float32 [B, D or 2D]."""
        self._check_config()
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(
                f"x must be a 2-D batch of points [B, D], got shape {x.shape}; "
                "flatten trailing axes with x.reshape(B, -1)."
            )
        batch, dim = x.shape
        t = check_timesteps(t, batch)
        y = labels_or_null(y, batch, self.num_classes)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        x_in = with_self_condition(x, x_self_cond, self.self_condition)
        if self.fourier_features:
            parts = [fourier_features(x_in, self.fourier_features, self.fourier_scale)]
        else:
            parts = [x_in.astype(jnp.float32)]
        if self.time_embedding != "none":
            temb = timestep_embedding(t, self.hidden)
            if self.time_embedding == "learned":
                temb = Dense(self.hidden, name="temb_dense0", **kw)(temb)
                temb = Dense(self.hidden, name="temb_dense1", **kw)(nn.silu(temb))
            parts.append(temb.astype(jnp.float32))
        if y is not None:
            label_emb = nn.Embed(
                self.num_classes + 1, self.hidden, param_dtype=self.param_dtype, name="label_emb"
            )
            parts.append(label_emb(y))

        h = nn.gelu(Dense(self.hidden, name="dense_in", **kw)(jnp.concatenate(parts, axis=-1)))
        for i in range(self.num_layers):
            u = nn.gelu(Dense(self.hidden, name=f"block_{i}", **kw)(h))
            h = h + nn.Dropout(self.dropout, deterministic=not train)(u)
        out = Dense(dim * (2 if self.learn_sigma else 1), name="dense_out", **kw)(h)
        return out.astype(jnp.float32)
