r"""The KL autoencoder of latent diffusion (Rombach et al. 2022) on scikit-learn's 8x8 digits.

    python train.py --config configs/digits_autoencoder.py --workdir /tmp/digits_autoencoder
    python train.py --config configs/digits_latent.py --workdir /tmp/digits_latent   # then this

An :class:`diffusion_jax.models.AutoencoderKL` with f = 2 (ch_mult (1, 2)): 8x8x1 digits <-> 4x4x2
latents (half as many numbers as pixels), 32 channels, one residual block per level, attention in
the middle block. Loss: L1 summed over the pixels + 1e-4 x KL to N(0, I) (LDM's 1e-6 is for 256x256
RGB images, 3,072 times as many pixels; 1e-4 keeps the digits' latents near unit scale without
hurting the reconstructions). At the end it writes ``<workdir>/latent_stats.json``: the scale
factor 1/std of the latents (posterior samples of all 1500 training digits) that
configs/digits_latent.py reads, and the held-out reconstruction MSE (also in TensorBoard, with a
picture of held-out digits over their reconstructions).

Cost: 800 steps of batch 64 (653,669 parameters): 4m57s wall on 2 CPU cores shared with other
jobs, 129 s of CPU time, 47 s of it the first step's compilation, so about two minutes on two idle
cores; seconds on a GPU. Measured: held-out reconstruction MSE 0.0147 (per pixel, images in
[-1, 1]), latents' std 2.21 (scale factor 0.452), mean 0.59.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    base = digits.get_config()
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = base.data
    config.data.use_labels = False  # the autoencoder does not need them

    # diffusion_jax.models.AutoencoderKL's arguments (out_channels: the data's), and its loss.
    config.autoencoder = ml_collections.ConfigDict()
    config.autoencoder.ch = 32
    config.autoencoder.ch_mult = (1, 2)  # f = 2: 8x8 -> 4x4
    config.autoencoder.num_res_blocks = 1
    config.autoencoder.z_channels = 2
    config.autoencoder.mid_attention = True
    config.autoencoder.dropout = 0.0
    config.autoencoder.dtype = "float32"
    config.autoencoder.loss = ml_collections.ConfigDict()
    config.autoencoder.loss.reconstruction = "l1"  # l1 | l2, summed over the pixels
    config.autoencoder.loss.kl_weight = 1e-4

    config.optim = base.optim
    config.optim.learning_rate = 1e-3
    config.ema = base.ema
    config.train = base.train
    config.train.num_steps = 800
    config.checkpoint = base.checkpoint
    config.checkpoint.every_steps = 400

    # The latent statistics and held-out reconstructions: every_steps (0: only at the end).
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 0
    config.eval.stats_examples = 4096  # up to this many training examples (the digits have 1500)
    config.eval.num_images = 32
    return config
