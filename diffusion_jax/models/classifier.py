"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The U-Net's encoder half (timestep embedding, residual blocks, attention, downsampling, middle
block) followed by GroupNorm, swish, global average pooling and a linear layer to the class logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffusion_jax.models.layers import check_timesteps, default_init, timestep_embedding
from diffusion_jax.models.unet import AttnBlock, Downsample, ResBlock, group_norm
from diffusion_jax.ops import Conv, Dense

Dtype = Any


class NoisyClassifier(nn.Module):
    """``(x_t [B, H, W, C], t [B]) -> logits [B, num_classes]`` (float32), trained on noised images.

    ``t`` is the 0-based timestep, as for the U-Net; the architecture options mean what they mean
    there (``attn_resolutions`` in feature-map pixels).
    """

    num_classes: int
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    num_heads: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: ArrayLike, t: ArrayLike, *, train: bool = False) -> jax.Array:
        """Class logits for noisy images x [B, H, W, C] at timesteps t [B] -> float32 [B, num_classes]."""
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"x must be a 4-D NHWC batch [B, H, W, C], got shape {x.shape}.")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}.")
        if self.ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm groups), got {self.ch}.")
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"H and W must be divisible by {factor} for ch_mult={tuple(self.ch_mult)}, got {x.shape[1:3]}."
            )
        t = check_timesteps(t, x.shape[0])
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = timestep_embedding(t, self.ch)
        emb = Dense(4 * self.ch, kernel_init=default_init(), name="temb_dense0", **kw)(emb)
        emb = Dense(4 * self.ch, kernel_init=default_init(), name="temb_dense1", **kw)(
            nn.swish(emb)
        )
        h = Conv(self.ch, (3, 3), kernel_init=default_init(), name="conv_in", **kw)(
            x.astype(self.dtype)
        )
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, self.dropout, name=f"down_{level}_res_{i}", **kw)(
                    h, emb, train
                )
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.num_heads, name=f"down_{level}_attn_{i}", **kw)(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(True, name=f"down_{level}_downsample", **kw)(h)
        h = ResBlock(h.shape[-1], self.dropout, name="mid_res", **kw)(h, emb, train)
        h = group_norm(h, "norm_out", self.param_dtype, swish=True)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return Dense(self.num_classes, name="logits", param_dtype=self.param_dtype)(h)
