"""Flax linen denoisers: the DDPM/ADM :class:`UNet` and the :class:`DiT` transformer (Peebles & Xie
2023) for NHWC images, :class:`MLPDenoiser` for points; and :class:`NoisyClassifier`, the
noise-aware classifier for classifier guidance; :class:`AutoencoderKL`, the KL autoencoder whose
latents a latent diffusion model learns (Rombach et al. 2022).

The denoisers and the classifier are called as ``model.apply(variables, x, t, y=None, train=False)``
with ``t`` [B] 0-based timesteps, return float32 and keep their parameters float32 whatever the
compute dtype. The denoisers built with ``self_condition=True`` also take ``x_self_cond=`` (the
previous x_0 estimate, shaped like x; Analog Bits self-conditioning).
"""

from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.classifier import NoisyClassifier
from diffusion_jax.models.dit import DIT_SIZES, DiT
from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.models.mlp import MLPDenoiser
from diffusion_jax.models.unet import UNet

__all__ = [
    "AutoencoderKL",
    "DIT_SIZES",
    "DiT",
    "MLPDenoiser",
    "NoisyClassifier",
    "UNet",
    "timestep_embedding",
]
