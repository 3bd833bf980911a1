r"""CelebA at 64x64 with the DDIM paper's CelebA model (Song et al. 2021): a 5-level U-Net
(ch 128, multipliers 1,2,2,2,4, two residual blocks, attention at 16x16, dropout 0.1; about 79M
parameters, 78,700,803), T = 1000 linear, Adam 2e-4, batch 128, EMA 0.9999, random flips; the
ddpm sampler uses the fixed-large variance beta_t, as the DDIM code's CelebA config does
(``var_type: fixedlarge`` in configs/celeba.yml; ``ddpm_steps`` in functions/denoising.py of
https://github.com/ermongroup/ddim samples with log-variance log beta_t).

    python train.py --config configs/celeba64.py --workdir gs://bucket/ddpm_celeba64

Needs ``celeb_a`` prepared for tensorflow-datasets (centre-cropped and resized to 64x64 by the
pipeline). Cost: each step sees 4x the pixels of a CIFAR-10 step with twice the parameters; expect
several times the CIFAR-10 time per step (not measured here), i.e. days of a TPU v4-8 for 500k steps.
On big slices, ``--config.model.dtype=bfloat16`` and ``--config.sharding.fsdp_min_size=1048576``
cut time and memory.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.crop = "center"
    config.model.ch_mult = (1, 2, 2, 2, 4)
    config.train.num_steps = 500_000
    return config
