r"""Latent diffusion on CIFAR-10: a DDPM U-Net on the 8x8x4 latents of configs/cifar10_autoencoder.py.

    python train.py --config configs/cifar10_autoencoder.py --workdir gs://bucket/cifar10_autoencoder
    python train.py --config configs/cifar10_latent.py --workdir gs://bucket/cifar10_latent \
        --config.latent.autoencoder_workdir=gs://bucket/cifar10_autoencoder
    python sample.py --workdir gs://bucket/cifar10_latent     # decoded 32x32 images

configs/cifar10.py (T = 1000 linear betas, eps prediction, batch 128, EMA 0.9999, unconditional)
with the U-Net resized for 8x8 latents: 128 channels at 8x8, 4x4 and 2x2 (ch_mult (1, 2, 2)),
two residual blocks per level, attention at 4x4 (25,840,900 parameters); 400k steps; DDIM-100 sample grids. Each batch is
encoded in the training step by the frozen autoencoder (a posterior sample times the scale factor
of its latent_stats.json, recorded in this run's config.json). Not yet run: cost and FID are
unmeasured; each step costs the U-Net on 64 positions instead of 1024, plus one encoder pass.
On a CPU use it only to check the set-up with ``--config.train.batch_size=8
--config.train.num_steps=20``, after a short autoencoder run.
"""

import ml_collections
from ml_collections import config_dict

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.latent = ml_collections.ConfigDict()
    config.latent.autoencoder_workdir = "/tmp/cifar10_autoencoder"
    config.latent.autoencoder_step = config_dict.placeholder(int)  # None: its newest checkpoint
    config.latent.scale_factor = config_dict.placeholder(float)  # None: its latent_stats.json
    config.sample.clip_denoised = False  # x_0 are latents of unit variance, not images in [-1, 1]

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2)  # 8x8, 4x4, 2x2 latents
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.train.num_steps = 400_000
    config.sample.sampler = "ddim"
    config.sample.num_steps = 100
    config.sample.variance = config_dict.placeholder(str)
    return config
