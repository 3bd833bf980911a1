r"""CIFAR-10 32x32 exactly as in the DDPM paper (Ho et al. 2020, Appendix B): the 35.7M-parameter
U-Net (ch 128, multipliers 1,2,2,2, two residual blocks per level, attention at 16x16, dropout 0.1),
T = 1000 linear betas 1e-4..0.02, Adam at 2e-4 with 5000 warm-up steps, batch 128, gradient
clipping at 1.0, EMA 0.9999, random horizontal flips, 800k steps; samples drawn by ancestral
sampling over all 1000 steps with the fixed-large reverse variance sigma_t^2 = beta_t.

    python train.py --config configs/cifar10.py --workdir gs://bucket/ddpm_cifar10

Needs CIFAR-10 prepared for tensorflow-datasets (see diffusion_jax/data/README.md). Cost: the paper
reports 10.6 hours for 800k steps on a TPU v3-8 (about 21 steps/s); a v4-8 or v5e-8 is in that
range. On a CPU it runs, but slowly (0.21 steps/s at batch 8 on 2 cores, after 40 s of compilation):
use it to check the set-up with ``--config.train.batch_size=8 --config.train.num_steps=20``.
"""

import ml_collections
from ml_collections import config_dict

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()

    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True
    config.data.use_labels = False

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_classes = config_dict.placeholder(int)  # unconditional, as in the paper

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.label_dropout = 0.0

    config.optim.optimizer = "adam"
    config.optim.learning_rate = 2e-4
    config.optim.lr_schedule = "constant"
    config.optim.warmup_steps = 5000
    config.optim.grad_clip_norm = 1.0

    config.ema.decay = 0.9999
    config.ema.warmup = False

    config.train.batch_size = 128
    config.train.num_steps = 800_000
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 10_000
    config.checkpoint.keep = 3

    config.sample.every_steps = 50_000
    config.sample.num_samples = 64
    config.sample.sampler = "ddpm"
    config.sample.num_steps = config_dict.placeholder(int)  # all 1000 steps
    # sigma_t^2 = beta_t: the released code's default, model_var_type='fixedlarge' in train() of
    # https://github.com/hojonathanho/diffusion/blob/master/scripts/run_cifar.py
    config.sample.variance = "fixed_large"
    return config
