"""The DDPM U-Net (Ho et al. 2020, ``diffusion_tf/models/unet.py``) with the ADM options of
improved-DDPM / Dhariwal & Nichol (2021): scale-shift norm, multi-head attention, class labels.

Images are NHWC. ``t`` is [B] the process's network time (DDPM's 0-based step, 0 = the paper's
t = 1; 1000 t for flow; 250 ln sigma for EDM: :meth:`Process.model_time`); the net only embeds its value. With the defaults and a 32x32x3 input this is the paper's 35.7M CIFAR-10 model
(35,746,307 parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffusion_jax.models.layers import (
    check_images,
    check_timesteps,
    default_init,
    labels_or_null,
    timestep_embedding,
    with_self_condition,
)
from diffusion_jax.ops import Conv, Dense, GroupNorm

Dtype = Any
GROUPS = 32  # GroupNorm groups, as in DDPM
NORM_EPS = 1e-6  # GroupNorm epsilon, as in DDPM


def group_norm(x: jax.Array, name: str, param_dtype: Dtype, swish: bool = False) -> jax.Array:
    """GroupNorm(32, eps=1e-6) computed in float32, then swish if asked; in ``x``'s dtype."""
    return GroupNorm(GROUPS, NORM_EPS, swish=swish, param_dtype=param_dtype, name=name)(x)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv3x3, + Dense(swish(emb)), GroupNorm-swish-dropout-conv3x3, + skip.

    ``scale_shift`` (ADM): the embedding projects to 2 * out_ch and the second norm's output becomes
    ``h * (1 + scale) + shift``. The last conv starts at zero, as in DDPM. x [B, H, W, C] -> [B, H, W, out_ch].
    """

    out_ch: int
    dropout: float = 0.0
    scale_shift: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(x, "norm1", self.param_dtype, swish=True)
        h = Conv(self.out_ch, (3, 3), kernel_init=default_init(), name="conv1", **kw)(h)
        emb_features = 2 * self.out_ch if self.scale_shift else self.out_ch
        emb_out = Dense(emb_features, kernel_init=default_init(), name="temb_proj", **kw)(
            nn.swish(emb)
        )[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = nn.swish(group_norm(h, "norm2", self.param_dtype) * (1 + scale) + shift)
        else:
            h = group_norm(h + emb_out, "norm2", self.param_dtype, swish=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.out_ch, (3, 3), kernel_init=default_init(0.0), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = Dense(self.out_ch, kernel_init=default_init(), name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions: GroupNorm, q/k/v Dense, softmax(q k^T / sqrt(d)), proj.

    Multi-head with ``num_heads`` heads of d = C / num_heads channels; residual. The attention is
    ``jax.nn.dot_product_attention``, whose logits and softmax are float32 whatever the compute
    dtype (bfloat16 q and k multiplied with float32 accumulation and output; the weights go back
    to v's dtype for the second product). x [B, H, W, C] -> [B, H, W, C].
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        d = c // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(x, "norm", self.param_dtype)

        def heads(name: str) -> jax.Array:
            out = Dense(c, kernel_init=default_init(), name=name, **kw)(h)
            # One axis change per reshape: explicit sharding (AxisType.Explicit) infers each
            # step's output sharding but refuses a merge and a split in one reshape.
            return out.reshape(b, height * width, c).reshape(b, height * width, self.num_heads, d)

        q, k, v = heads("q"), heads("k"), heads("v")
        out = jax.nn.dot_product_attention(q, k, v)  # [B, HW, heads, d]; logits scaled by d**-0.5
        out = out.reshape(b, height * width, c).reshape(b, height, width, c)
        out = Dense(c, kernel_init=default_init(0.0), name="proj_out", **kw)(out)
        return x + out


class Downsample(nn.Module):
    """Halve H and W: conv3x3 stride 2 ('SAME' pads after, as TF does in DDPM), or 2x2 average pool."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        conv = Conv(
            x.shape[-1],
            (3, 3),
            strides=(2, 2),
            kernel_init=default_init(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )
        return conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then conv3x3 when ``with_conv``."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if not self.with_conv:
            return x
        conv = Conv(
            x.shape[-1],
            (3, 3),
            kernel_init=default_init(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )
        return conv(x)


class UNet(nn.Module):
    """The DDPM / ADM U-Net denoiser: ``(x [B, H, W, C], t [B], y [B] | None) -> [B, H, W, out]``.

    ``out = out_channels or C``, doubled when ``learn_sigma`` (first half the eps/x0/v prediction,
    second half the improved-DDPM variance interpolation v). Level i works at H / 2**i with
    ``ch * ch_mult[i]`` channels; ``attn_resolutions`` names feature-map heights in pixels (16 = the
    16x16 maps). ``num_head_channels``, when set, overrides ``num_heads``. With ``num_classes`` set,
    label ``num_classes`` is the null class and ``y = None`` means it for every example.
    ``dtype`` is the compute dtype (GroupNorm and softmax stay float32); the output is float32.
    ``remat`` recomputes each ResBlock on the backward pass to save memory. The layers come from
    ``diffusion_jax.ops``, whose platform picks their gradients; reverse and forward mode
    (``jax.grad``, ``jax.jvp`` / ``jax.jacfwd``) both go through the net. ``self_condition``
    (Analog Bits self-conditioning) gives ``conv_in`` C more input channels, for the previous x_0
    estimate ``x_self_cond`` [B, H, W, C] (zeros when None).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    out_channels: int | None = None
    num_heads: int = 1
    num_head_channels: int | None = None
    resblock_scale_shift: bool = False
    num_classes: int | None = None
    learn_sigma: bool = False
    resamp_with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    self_condition: bool = False

    def _check_config(self) -> None:
        if self.ch <= 0 or self.ch % GROUPS:
            raise ValueError(
                f"ch must be a positive multiple of {GROUPS} (GroupNorm uses {GROUPS} groups), "
                f"got ch={self.ch}; use e.g. ch=32, 64 or 128."
            )
        if len(self.ch_mult) == 0 or any(int(m) < 1 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty sequence of positive ints, got {tuple(self.ch_mult)}."
            )
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be None or >= 1, got {self.out_channels}.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}.")
        if self.num_head_channels is None and self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}.")
        if self.num_head_channels is not None and self.num_head_channels < 1:
            raise ValueError(
                f"num_head_channels must be None or >= 1, got {self.num_head_channels}."
            )

    def _heads(self, channels: int) -> int:
        """Number of attention heads for a block with ``channels`` channels."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels={self.num_head_channels} must divide the {channels} channels "
                    "of every attention block; choose a divisor of ch * ch_mult at those levels."
                )
            return channels // self.num_head_channels
        if channels % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the {channels} channels of every attention "
                "block; choose a divisor of ch * ch_mult at those levels."
            )
        return self.num_heads

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
        """Predict from x [B, H, W, C] at timesteps t [B] (labels y [B]; with ``self_condition``,
        the x_0 estimate x_self_cond [B, H, W, C]) -> float32 [B, H, W, out]."""
        self._check_config()
        x = check_images(x)
        batch, height, width, in_ch = x.shape
        x_in = with_self_condition(x, x_self_cond, self.self_condition).astype(self.dtype)
        num_levels = len(self.ch_mult)
        factor = 2 ** (num_levels - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"H and W must be divisible by 2**(len(ch_mult) - 1) = {factor} for the "
                f"{num_levels}-level U-Net, got H={height}, W={width}; pad or resize the input, "
                "or use a shorter ch_mult."
            )
        resolutions = [height // 2**i for i in range(num_levels)]
        missing = sorted(set(self.attn_resolutions) - set(resolutions))
        if missing:
            raise ValueError(
                f"attention resolution(s) {missing} never occur: for H={height} the feature maps are "
                f"{resolutions} pixels high; choose attn_resolutions from those."
            )
        attn_channels = {
            self.ch * m
            for m, r in zip(self.ch_mult, resolutions, strict=True)
            if r in self.attn_resolutions
        }
        for channels in sorted(attn_channels | {self.ch * self.ch_mult[-1]}):  # + the middle block
            self._heads(channels)
        t = check_timesteps(t, batch)
        y = labels_or_null(y, batch, self.num_classes)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch, emb_ch = self.ch, 4 * self.ch
        block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

        def res(h: jax.Array, out_ch: int, name: str) -> jax.Array:
            module = block(out_ch, self.dropout, self.resblock_scale_shift, name=name, **kw)
            return module(h, emb, train)  # train positional: static under remat

        def attn(h: jax.Array, name: str) -> jax.Array:
            return AttnBlock(self._heads(h.shape[-1]), name=name, **kw)(h)

        # Timestep (+ class) embedding: sinusoid -> Dense(4ch) -> swish -> Dense(4ch).
        emb = timestep_embedding(t, ch)
        emb = Dense(emb_ch, kernel_init=default_init(), name="temb_dense0", **kw)(emb)
        emb = Dense(emb_ch, kernel_init=default_init(), name="temb_dense1", **kw)(nn.swish(emb))
        if y is not None:
            emb = emb + nn.Embed(self.num_classes + 1, emb_ch, name="label_emb", **kw)(y)

        # Down path: store every output for the skip connections.
        h = Conv(ch, (3, 3), kernel_init=default_init(), name="conv_in", **kw)(x_in)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res(h, ch * mult, f"down_{level}_res_{i}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != num_levels - 1:
                h = Downsample(self.resamp_with_conv, name=f"down_{level}_downsample", **kw)(h)
                skips.append(h)

        # Middle: Res, Attn, Res.
        h = res(h, h.shape[-1], "mid_res_0")
        h = attn(h, "mid_attn")
        h = res(h, h.shape[-1], "mid_res_1")

        # Up path: num_res_blocks + 1 blocks per level, each eating one stored skip.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(h, ch * self.ch_mult[level], f"up_{level}_res_{i}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h, f"up_{level}_attn_{i}")
            if level != 0:
                h = Upsample(self.resamp_with_conv, name=f"up_{level}_upsample", **kw)(h)
        assert not skips, "every skip connection is used exactly once"

        out_ch = (self.out_channels or in_ch) * (2 if self.learn_sigma else 1)
        h = group_norm(h, "norm_out", self.param_dtype, swish=True)
        h = Conv(out_ch, (3, 3), kernel_init=default_init(0.0), name="conv_out", **kw)(h)
        return h.astype(jnp.float32)
