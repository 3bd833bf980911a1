r"""The KL autoencoder of latent diffusion (Rombach et al. 2022) for CIFAR-10, on an accelerator.

    python train.py --config configs/cifar10_autoencoder.py --workdir gs://bucket/cifar10_autoencoder
    python train.py --config configs/cifar10_latent.py --workdir gs://bucket/cifar10_latent

LDM's KL-f4 layout at 32x32: f = 4 (ch_mult (1, 2, 4)) and z_channels = 4, so 32x32x3 images <->
8x8x4 latents (12x fewer numbers), 128 channels, two residual blocks per level, attention in the
middle block (55,325,835 parameters); L1 reconstruction plus 1e-6 x KL as in LDM (no LPIPS or adversarial term: see
diffusion_jax/autoencoder_trainer.py). Adam at 2e-4 after 1000 warm-up steps, batch 128, 100k
steps, EMA 0.999. At the end ``<workdir>/latent_stats.json`` holds the scale factor (1/std of the
posterior samples of the first 8192 training images) that configs/cifar10_latent.py reads.

Needs CIFAR-10 prepared for tensorflow-datasets (see diffusion_jax/data/README.md). Not yet run:
its cost and reconstruction quality are unmeasured. On a CPU use it only to check the set-up: ``--config.train.batch_size=8
--config.train.num_steps=20 --config.eval.stats_examples=64``.
"""

import ml_collections

from configs import cifar10, digits_autoencoder


def get_config() -> ml_collections.ConfigDict:
    config = digits_autoencoder.get_config()
    config.data = cifar10.get_config().data  # tfds cifar10, 32x32x3, random flips, no labels

    config.autoencoder.ch = 128
    config.autoencoder.ch_mult = (1, 2, 4)  # f = 4: 32x32 -> 8x8
    config.autoencoder.num_res_blocks = 2
    config.autoencoder.z_channels = 4
    config.autoencoder.mid_attention = True
    config.autoencoder.dtype = "bfloat16"  # float32 on GPUs without bfloat16
    config.autoencoder.loss.reconstruction = "l1"
    config.autoencoder.loss.kl_weight = 1e-6

    config.optim.learning_rate = 2e-4
    config.optim.lr_schedule = "constant"
    config.optim.warmup_steps = 1000
    config.ema.decay = 0.999
    config.ema.warmup = True
    config.train.batch_size = 128
    config.train.num_steps = 100_000
    config.train.log_every_steps = 100
    config.checkpoint.every_steps = 10_000
    config.eval.every_steps = 10_000
    config.eval.stats_examples = 8192
    config.eval.num_images = 32
    return config
