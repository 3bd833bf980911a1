r"""CIFAR-10 on the DDPM paper's 35.7M-parameter U-Net (configs/cifar10.py), trained by flow matching.

    python train.py --config configs/cifar10_flow.py --workdir gs://bucket/flow_cifar10

Rectified flow x_t = (1 - t) x_0 + t eps with velocity prediction at logit-normal t (SD3), sampled
with 50 Euler steps (50 network evaluations; heun or dpm_solver_2m reach similar quality with
fewer). The training step costs what configs/cifar10.py's does (same network and batch: the
noise process changes only elementwise maths); see the README's TPU table for its estimate.
"""

import ml_collections

from configs import cifar10, digits_flow


def get_config() -> ml_collections.ConfigDict:
    return digits_flow.flow_matching(cifar10.get_config(), num_steps=50)
