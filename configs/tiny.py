r"""A tiny run for tests and smoke checks: 8x8 digits, a 2-level U-Net with 32 channels, T=100.

    python train.py --config configs/tiny.py --workdir /tmp/diffusion_tiny

About a minute on 2 CPU cores, nearly all of it compilation (seconds with a warm JAX compilation
cache); the samples are not meant to look like digits.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.data.image_size = 8
    config.data.num_threads = 0  # no background reader: deterministic timing in tests
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.1
    config.diffusion.num_timesteps = 100
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 0
    config.optim.lr_schedule = "constant"
    config.ema.decay = 0.9
    config.train.batch_size = 8
    config.train.num_steps = 20
    config.train.log_every_steps = 5
    config.checkpoint.every_steps = 10
    config.checkpoint.keep = 2
    config.sample.every_steps = 0
    config.sample.num_samples = 8
    config.sample.sampler = "ddim"
    config.sample.num_steps = 10
    return config
