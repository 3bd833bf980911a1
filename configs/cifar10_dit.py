r"""CIFAR-10 32x32 with DiT-S/2 (Peebles & Xie 2023) in place of the DDPM U-Net (configs/cifar10.py).

    python train.py --config configs/cifar10_dit.py --workdir gs://bucket/dit_cifar10

DiT-S/2 on pixels: 2x2 patches give 256 tokens of width 384 through 12 adaLN-Zero blocks of 6
heads, 32,471,436 parameters (fixed sin-cos positions, unconditional), near the U-Net's 35.7M.
The optimiser is the DiT paper's (Adam at a constant 1e-4, no warm-up); everything else (T = 1000
linear betas, eps prediction, batch 128, EMA 0.9999, 800k steps, ancestral samples) is
configs/cifar10.py's. ``--config.model.size=B/2`` gives DiT-B/2 (130M). Not yet run: its cost and
quality are unmeasured; on a CPU use it only to check the set-up, with
``--config.train.batch_size=8 --config.train.num_steps=20``.
"""

import ml_collections

from configs import cifar10, digits_dit


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.model = digits_dit.dit_model(size="S/2")  # unconditional, as configs/cifar10.py
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    return config
