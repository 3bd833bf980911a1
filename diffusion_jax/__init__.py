"""diffusion_jax: diffusion models in JAX/Flax: DDPM and its successors, flow matching and EDM.

The core is a noise process x_t = alpha(t) x_0 + sigma(t) eps (:mod:`diffusion_jax.processes`: VP
from any beta schedule, rectified flow, EDM); the discrete T-step DDPM process is a :class:`Schedule`
pytree whose timesteps count from 0 (``t = 0`` is the paper's ``t = 1``, least noisy). The maths is
pure functions; samplers are built by :func:`make_sampler` and compile to one program each.
"""

from diffusion_jax.forward import (
    edm_preconditioning,
    output_target,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    v_target,
    x0_eps_from_output,
)
from diffusion_jax.losses import (
    classifier_loss,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    prior_bpd,
    vb_term_bpd,
)
from diffusion_jax.models import (
    AutoencoderKL,
    DiT,
    MLPDenoiser,
    NoisyClassifier,
    UNet,
    timestep_embedding,
)
from diffusion_jax.processes import Process, make_process, sampling_levels
from diffusion_jax.sampling import (
    classifier_free_guidance,
    classifier_guidance,
    make_img2img,
    make_inpainter,
    make_sampler,
    p_mean_variance,
)
from diffusion_jax.schedules import (
    Schedule,
    betas_for_schedule,
    karras_timesteps,
    make_schedule,
    respace,
    schedule_from_betas,
    space_timesteps,
)

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "DiT",
    "MLPDenoiser",
    "NoisyClassifier",
    "Process",
    "edm_preconditioning",
    "make_process",
    "output_target",
    "sampling_levels",
    "x0_eps_from_output",
    "UNet",
    "Schedule",
    "betas_for_schedule",
    "classifier_free_guidance",
    "classifier_guidance",
    "classifier_loss",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "make_img2img",
    "make_inpainter",
    "make_sampler",
    "karras_timesteps",
    "make_schedule",
    "normal_kl",
    "p_mean_variance",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "schedule_from_betas",
    "space_timesteps",
    "timestep_embedding",
    "v_target",
    "vb_term_bpd",
]
