"""Latent diffusion (Rombach et al. 2022): a diffusion model of the latents of a frozen
:class:`~diffusion_jax.models.AutoencoderKL`, sampled in latent space and decoded to images.

The latents the diffusion model learns are ``z = scale_factor * z_ae``, where ``z_ae`` is a
posterior sample of the autoencoder's encoder, mean + exp(logvar / 2) * eps (LDM's
``get_first_stage_encoding``), and ``scale_factor = 1 / std(z_ae)`` over training images, so that
the latents have unit variance like the data a noise process expects (LDM's 0.18215 for its KL-f8
model). The autoencoder trainer measures it (:data:`LATENT_STATS_FILE`).

Everything here is a pure function of explicit parameters and keys:

* :func:`make_latent_encoder` -> ``encode(autoencoder_params, x, rng) -> z``, what the diffusion
  trainer calls inside its jitted step on each batch;
* :func:`make_latent_sampler` wraps a latent sampler into ``sample(params, rng, shape, **kw)`` with
  ``params = {"diffusion": ..., "autoencoder": ...}`` and ``shape`` the *image* shape
  (B, H, W, C), returning decoded images clipped to [-1, 1]: the same call as a pixel model's
  sampler, so :func:`checkpoints.load_sampler`, ``sample.py``, ``evaluate.py`` and the trainer's
  sample grids work unchanged, under the caller's own ``jax.jit`` / ``jax.vmap`` too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax.models.autoencoder import AutoencoderKL, sample_posterior

# Written by the autoencoder trainer into its workdir: {"scale_factor", "std", "mean",
# "mean_std", "num_examples", "step", "latents"}.
LATENT_STATS_FILE = "latent_stats.json"


def encode_fn_for(
    autoencoder: AutoencoderKL,
) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``encode(params, x) -> (mean, logvar)`` of the autoencoder in inference mode."""
    return lambda params, x: autoencoder.apply({"params": params}, x, method=autoencoder.encode)


def decode_fn_for(autoencoder: AutoencoderKL) -> Callable[[Any, jax.Array], jax.Array]:
    """``decode(params, z) -> x`` of the autoencoder in inference mode (unscaled latents)."""
    return lambda params, z: autoencoder.apply({"params": params}, z, method=autoencoder.decode)


def make_latent_encoder(
    encode_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]], scale_factor: float
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``encode(autoencoder_params, x [B, H, W, C], rng) -> z [B, H/f, W/f, z_channels]``: a
    posterior sample scaled by ``scale_factor``, with the encoder's parameters held fixed
    (``stop_gradient``)."""

    def encode(params: Any, x: jax.Array, rng: jax.Array) -> jax.Array:
        mean, logvar = encode_fn(jax.lax.stop_gradient(params), x)
        z = sample_posterior(mean, logvar, rng)
        return jax.lax.stop_gradient(scale_factor * z)

    return encode


def make_latent_sampler(
    sample_fn: Callable[..., jax.Array],
    decode_fn: Callable[[Any, jax.Array], jax.Array],
    scale_factor: float,
    factor: int,
    latent_channels: int,
) -> Callable[..., jax.Array]:
    """``sample(params, rng, shape, **model_kwargs) -> images`` of a latent diffusion model.

    ``sample_fn(params, rng, latent_shape, **model_kwargs)``: the diffusion model's sampler over
    latents (e.g. :func:`dj.make_sampler`'s). ``decode_fn(params, z)``: the autoencoder's decoder
    (:func:`decode_fn_for`). ``params``: {"diffusion": the diffusion model's, "autoencoder": the
    autoencoder's}. ``shape``: the images' (B, H, W, C), mapped to the latents'
    (B, H/factor, W/factor, latent_channels); C is what the decoder gives. The latents are divided
    by ``scale_factor`` before decoding; the images are clipped to [-1, 1].
    """

    def sample(params: Any, rng: jax.Array, shape: tuple[int, ...], **model_kwargs: Any):
        if len(shape) != 4:
            raise ValueError(f"shape must be the images' (B, H, W, C), got {tuple(shape)}.")
        batch, height, width, _ = shape
        if height % factor or width % factor:
            raise ValueError(
                f"images of {height}x{width} are not a whole number of {factor}x{factor} latents."
            )
        latent_shape = (batch, height // factor, width // factor, latent_channels)
        z = sample_fn(params["diffusion"], rng, latent_shape, **model_kwargs)
        x = decode_fn(params["autoencoder"], z / scale_factor)
        return jnp.clip(x, -1.0, 1.0)

    return sample


def latent_statistics(latents: np.ndarray, means: np.ndarray) -> dict[str, float]:
    """Statistics of unscaled latents, in float64: ``std`` of all elements of ``latents``
    (posterior samples), ``scale_factor = 1 / std``, their ``mean``, and ``mean_std``, the std of
    the posterior ``means`` (how much of the spread is the encoder's noise)."""
    latents = np.asarray(latents, np.float64)
    std = float(np.std(latents))
    if not std > 0 or not np.isfinite(std):
        raise ValueError(f"the latents have std {std}: no scale factor can be measured.")
    return {
        "scale_factor": 1.0 / std,
        "std": std,
        "mean": float(np.mean(latents)),
        "mean_std": float(np.std(np.asarray(means, np.float64))),
    }


def read_latent_stats(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The :data:`LATENT_STATS_FILE` of an autoencoder workdir, or None if it has none."""
    path = epath.Path(workdir) / LATENT_STATS_FILE
    return json.loads(path.read_text()) if path.exists() else None
