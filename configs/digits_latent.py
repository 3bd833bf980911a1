r"""Latent diffusion on the digits: the default digits model on the 4x4x2 latents of the autoencoder
trained by configs/digits_autoencoder.py, decoded to 8x8 images.

    python train.py --config configs/digits_autoencoder.py --workdir /tmp/digits_autoencoder
    python train.py --config configs/digits_latent.py --workdir /tmp/digits_latent
    python sample.py --workdir /tmp/digits_latent          # decoded samples, like any run's

Each batch of digits is encoded inside the training step by the frozen autoencoder's EMA
parameters to z = scale_factor * (mean + exp(logvar / 2) * eps), a posterior sample (as LDM
does), with scale_factor = 1/std of the latents from ``<autoencoder_workdir>/latent_stats.json``;
the run's ``config.json`` records the autoencoder's step, scale factor and network, and
sample.py, evaluate.py and the sample grids decode with them. The U-Net works at 4x4 and 2x2
(32 and 64 channels), class-conditional with labels dropped 10% of the time; everything else is
configs/digits.py. Sampling does not clip the predicted x_0 (``sample.clip_denoised = False``, which
latent runs require): the latents are not images in [-1, 1].

Measured on 2 CPU cores shared with other jobs, on the autoencoder of configs/digits_autoencoder.py
(800 steps, scale factor 0.452): 4m42s wall, 223 s of CPU time, 36 s of it the first step's
compilation, three sample grids included (703,330 parameters). evaluate.py (DDIM 50, 297 samples):
digits FD 11.7, precision 0.68, recall 0.86; the pixel model of configs/digits.py scores 6.83 /
0.76 / 0.85 there (diffusion_jax/evaluation/README.md) and the within-train floor is 7.5 +- 1.5,
so at this size the autoencoder's reconstruction error (held-out MSE 0.015) costs more than the
4x smaller input saves.
"""

import ml_collections
from ml_collections import config_dict

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.latent = ml_collections.ConfigDict()
    config.latent.autoencoder_workdir = "/tmp/digits_autoencoder"
    config.latent.autoencoder_step = config_dict.placeholder(int)  # None: its newest checkpoint
    config.latent.scale_factor = config_dict.placeholder(float)  # None: its latent_stats.json
    config.sample.clip_denoised = False  # x_0 are latents of unit variance, not images in [-1, 1]

    config.model.ch = 32
    config.model.ch_mult = (1, 2)  # feature maps of 4x4 and 2x2 latents
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (2,)
    return config
