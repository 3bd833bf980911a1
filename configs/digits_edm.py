r"""The digits model trained as EDM (Karras et al. 2022): VE noise with sigma-preconditioning.

    python train.py --config configs/digits_edm.py --workdir /tmp/diffusion_digits_edm

x_t = x_0 + sigma eps; the U-Net is EDM's preconditioned F (c_skip, c_out, c_in, c_noise with
sigma_data = 0.5) trained at ln sigma ~ N(-1.2, 1.2^2) (P_mean, P_std), and samples with EDM's
deterministic Heun sampler on 18 rho=7 levels from sigma_max = 80 to sigma_min = 0.002 (35 network
evaluations; Algorithm 2 with S_churn = 0). Same network, data, optimiser and steps as
configs/digits.py: about 5 minutes on 2 CPU cores.
"""

import ml_collections

from configs import digits


def edm(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` switched to EDM: preconditioned denoiser, log-normal sigma, 18 Heun steps."""
    config.diffusion.process = "edm"
    config.diffusion.prediction = "edm"
    config.diffusion.sigma_min = 0.002
    config.diffusion.sigma_max = 80.0
    config.diffusion.rho = 7.0
    config.diffusion.sigma_data = 0.5
    config.diffusion.time_sampling = "log_normal"
    config.diffusion.time_loc = -1.2
    config.diffusion.time_scale = 1.2
    config.sample.sampler = "heun"
    config.sample.num_steps = 18
    return config


def get_config() -> ml_collections.ConfigDict:
    return edm(digits.get_config())
