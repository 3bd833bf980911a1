r"""CIFAR-10 on the DDPM paper's 35.7M-parameter U-Net (configs/cifar10.py), trained as EDM.

    python train.py --config configs/cifar10_edm.py --workdir gs://bucket/edm_cifar10

Karras et al. (2022)'s VE preconditioning (sigma_data = 0.5), ln sigma ~ N(-1.2, 1.2^2) and the
deterministic Heun sampler on 18 rho = 7 levels (35 network evaluations; their CIFAR-10 setting,
FID 1.97 with their larger DDPM++/NCSN++ networks and 200M images). The training step costs what
configs/cifar10.py's does (same network and batch).
"""

import ml_collections

from configs import cifar10, digits_edm


def get_config() -> ml_collections.ConfigDict:
    config = digits_edm.edm(cifar10.get_config())
    config.optim.learning_rate = 1e-3  # EDM's CIFAR-10 rate, with their 10M-image warm-up scaled
    return config
