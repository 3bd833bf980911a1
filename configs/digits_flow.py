r"""The digits model trained by flow matching (rectified flow; Liu et al. 2022, Lipman et al. 2022).

    python train.py --config configs/digits_flow.py --workdir /tmp/diffusion_digits_flow

x_t = (1 - t) x_0 + t eps; the U-Net predicts the velocity eps - x_0 at t drawn logit-normally
(location 0, scale 1: SD3's choice, Esser et al. 2024), and samples with 20 Euler steps on evenly
spaced t (20 network evaluations). Same network, data, optimiser and steps as configs/digits.py, so
the same cost: about 5 minutes on 2 CPU cores; sampling costs 20 evaluations instead of 100.

The best of the four objectives at equal training cost (``python -m benchmarks.quality --objectives
ddpm_eps,ddpm_v,flow,edm --train_steps 600``; see benchmarks/README.md): digits FD 5.6-6.4 at 5-50
evaluations against 15.6 for DDPM's DDIM-50 and 10.4 for its 1000-step ancestral chain, and
unconditional samples at 0.8-0.9x the held-out floor against 1.2-4.6x. configs/digits.py stays the
DDPM model because the tutorials, figures and the digits classifier-guidance example are built on it.
"""

import ml_collections

from configs import digits


def flow_matching(config: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
    """``config`` switched to rectified flow: velocity prediction, logit-normal(0, 1) t, Euler."""
    config.diffusion.process = "flow"
    config.diffusion.prediction = "flow"
    config.diffusion.time_sampling = "logit_normal"
    config.diffusion.time_loc = 0.0
    config.diffusion.time_scale = 1.0
    config.sample.sampler = "euler"
    config.sample.num_steps = num_steps
    return config


def get_config() -> ml_collections.ConfigDict:
    return flow_matching(digits.get_config(), num_steps=20)
