"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", sec. 3.1 and appendix G; ``ldm/models/autoencoder.py``).

The encoder maps an image x [B, H, W, C] to the moments of a diagonal Gaussian posterior
q(z | x) = N(mean, exp(logvar)) over latents z [B, H/f, W/f, z_channels], f = 2^(len(ch_mult) - 1);
the decoder maps z back to an image. Training minimises a reconstruction loss plus a small weight
times KL(q(z | x) || N(0, I)) (:func:`kl_to_standard_normal`), which keeps the latent space from
growing arbitrarily; the diffusion model then learns the distribution of the latents.

The blocks are the U-Net's (:mod:`diffusion_jax.models.unet`) without the timestep embedding:
GroupNorm(32)+swish residual blocks, stride-2 convolutions down, nearest-neighbour x2 + conv up, and
optional self-attention in the middle block as in LDM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffusion_jax.models.layers import check_images, default_init
from diffusion_jax.models.unet import GROUPS, AttnBlock, Downsample, Upsample, group_norm
from diffusion_jax.ops import Conv

Dtype = Any
# LDM's DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def kl_to_standard_normal(mean: ArrayLike, logvar: ArrayLike) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over all latent dimensions:
    0.5 * sum(mean^2 + exp(logvar) - 1 - logvar). [B, ...] -> float32 [B]."""
    mean = jnp.asarray(mean, jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def sample_posterior(mean: ArrayLike, logvar: ArrayLike, rng: jax.Array) -> jax.Array:
    """A reparameterised draw z = mean + exp(logvar / 2) * eps, eps ~ N(0, I), of mean's shape."""
    mean = jnp.asarray(mean)
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * jnp.asarray(logvar)) * eps


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3, GroupNorm-swish-dropout-conv3x3, + skip (a 1x1 conv when the
    channels change): the U-Net's residual block without the timestep embedding (LDM's
    ``ResnetBlock`` with ``temb_channels=0``). x [B, H, W, C] -> [B, H, W, out_ch]."""

    out_ch: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(x, "norm1", self.param_dtype, swish=True)
        h = Conv(self.out_ch, (3, 3), kernel_init=default_init(), name="conv1", **kw)(h)
        h = group_norm(h, "norm2", self.param_dtype, swish=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.out_ch, (3, 3), kernel_init=default_init(), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_ch:
            x = Conv(self.out_ch, (1, 1), kernel_init=default_init(), name="nin_shortcut", **kw)(x)
        return x + h


class Encoder(nn.Module):
    """x [B, H, W, C] -> moments [B, H/f, W/f, 2 * z_channels] (mean, then log-variance)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    mid_attention: bool
    dropout: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Conv(self.ch, (3, 3), kernel_init=default_init(), name="conv_in", **kw)(
            x.astype(self.dtype)
        )
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, name=f"down_{level}_res_{i}", **kw)(
                    h, train
                )
            if level != len(self.ch_mult) - 1:
                h = Downsample(True, name=f"down_{level}_downsample", **kw)(h)
        h = _middle(h, self.mid_attention, self.dropout, train, kw)
        h = group_norm(h, "norm_out", self.param_dtype, swish=True)
        return Conv(2 * self.z_channels, (3, 3), kernel_init=default_init(), name="conv_out", **kw)(
            h
        )


class Decoder(nn.Module):
    """z [B, h, w, z_channels] -> x [B, h f, w f, out_channels] (the encoder mirrored; each level
    has ``num_res_blocks + 1`` residual blocks, as in LDM)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    mid_attention: bool
    dropout: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Conv(
            self.ch * self.ch_mult[-1], (3, 3), kernel_init=default_init(), name="conv_in", **kw
        )(z.astype(self.dtype))
        h = _middle(h, self.mid_attention, self.dropout, train, kw)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = ResnetBlock(
                    self.ch * self.ch_mult[level], self.dropout, name=f"up_{level}_res_{i}", **kw
                )(h, train)
            if level != 0:
                h = Upsample(True, name=f"up_{level}_upsample", **kw)(h)
        h = group_norm(h, "norm_out", self.param_dtype, swish=True)
        out = Conv(self.out_channels, (3, 3), kernel_init=default_init(), name="conv_out", **kw)(h)
        return out.astype(jnp.float32)


def _middle(h: jax.Array, attention: bool, dropout: float, train: bool, kw: dict) -> jax.Array:
    """LDM's middle block: residual block, self-attention (if asked), residual block. Called inside
    an ``nn.compact`` method, so the modules are the caller's children."""
    c = h.shape[-1]
    h = ResnetBlock(c, dropout, name="mid_res_0", **kw)(h, train)
    if attention:
        h = AttnBlock(1, name="mid_attn", **kw)(h)
    return ResnetBlock(c, dropout, name="mid_res_1", **kw)(h, train)


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: :meth:`encode` x -> (mean, logvar), :meth:`decode` z -> x, and
    ``__call__(x, rng)`` -> (reconstruction, mean, logvar), decoding a posterior sample drawn with
    ``rng`` (or the posterior mean when ``rng`` is None).

    Images are NHWC in [-1, 1] with ``out_channels`` channels; the latents have ``z_channels``
    channels at 1/f the resolution, f = :attr:`factor` = 2^(len(ch_mult) - 1). ``logvar`` is clipped
    to [-30, 20] as in LDM. ``dtype`` is the compute dtype (GroupNorm and softmax stay float32);
    every output is float32. There is no perceptual (LPIPS) or adversarial term here: those are
    the loss's business, and the library has no offline feature network to build LPIPS on.

    Use as ``model.apply(variables, x, method=model.encode)`` and ``method=model.decode``.
    """

    out_channels: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    mid_attention: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def factor(self) -> int:
        """The downsampling factor f: latents are H/f x W/f."""
        return 2 ** (len(self.ch_mult) - 1)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(H/f, W/f, z_channels) of an image shape (H, W, C); a ValueError if f does not divide."""
        height, width, channels = image_shape
        f = self.factor
        if height % f or width % f:
            raise ValueError(
                f"images of {height}x{width} do not split into latents with the autoencoder's "
                f"factor f={f} (ch_mult={tuple(self.ch_mult)}): H and W must be multiples of {f}."
            )
        if channels != self.out_channels:
            raise ValueError(
                f"the autoencoder takes images of {self.out_channels} channels, got {channels}."
            )
        return height // f, width // f, self.z_channels

    def _check_config(self) -> None:
        if self.ch <= 0 or self.ch % GROUPS:
            raise ValueError(
                f"ch must be a positive multiple of {GROUPS} (GroupNorm uses {GROUPS} groups), "
                f"got ch={self.ch}."
            )
        if len(self.ch_mult) == 0 or any(int(m) < 1 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty sequence of positive ints, got {tuple(self.ch_mult)}."
            )
        for name in ("out_channels", "z_channels", "num_res_blocks"):
            if getattr(self, name) < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name}={getattr(self, name)} is out of range.")

    def setup(self):
        self._check_config()
        common = dict(
            ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
            mid_attention=self.mid_attention, dropout=self.dropout, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )  # fmt: skip
        self.encoder = Encoder(z_channels=self.z_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)

    def encode(self, x: ArrayLike, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """x [B, H, W, C] -> (mean, logvar), each float32 [B, H/f, W/f, z_channels]."""
        x = check_images(x)
        self.latent_shape(x.shape[1:])
        moments = self.encoder(x, train).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: ArrayLike, train: bool = False) -> jax.Array:
        """z [B, h, w, z_channels] -> x float32 [B, h f, w f, out_channels] (not clipped)."""
        z = jnp.asarray(z)
        if z.ndim != 4 or z.shape[-1] != self.z_channels:
            raise ValueError(
                f"z must be [B, h, w, {self.z_channels}] latents, got shape {z.shape}."
            )
        return self.decoder(z, train)

    def __call__(
        self, x: ArrayLike, rng: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reconstruction [B, H, W, C], mean, logvar) of x; z ~ q(z | x) with ``rng``, else z = mean."""
        mean, logvar = self.encode(x, train)
        z = mean if rng is None else sample_posterior(mean, logvar, rng)
        return self.decode(z, train), mean, logvar
