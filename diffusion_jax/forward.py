"""The forward (noising) process of Ho et al. (2020) and conversions between parameterisations.

``t`` is an int array of 0-based timesteps of shape [B] (see :mod:`diffusion_jax.schedules`);
``x`` arrays have a leading batch axis [B, ...] and any trailing shape (NHWC images, [B, D] points).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


def extract(coef: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """``coef[t]`` reshaped to [B, 1, ..., 1] so it broadcasts against ``x`` [B, ...]."""
    t = jnp.asarray(t)
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must have shape [B] = ({x.shape[0]},) to match x {x.shape}, got {t.shape}."
        )
    out = jnp.take(coef, t)
    return out.reshape(out.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def q_mean_variance(
    schedule: Schedule, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (eq. 4)."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
    variance = jnp.broadcast_to(
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) ** 2, x0.shape
    )
    log_variance = jnp.broadcast_to(extract(schedule.log_one_minus_alphas_cumprod, t, x0), x0.shape)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a draw from q(x_t | x_0) (Ho et al. eq. 4)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} must equal x0 shape {x0.shape}.")
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7).

    At t = 0 (the paper's t = 1) the mean is x_0 and the variance 0; the log-variance is clipped to
    that of t = 1, as in improved-DDPM.
    """
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(
        extract(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape
    )
    return mean, variance, log_variance


def predict_x0_from_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_x0(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, 'v-prediction')."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v
    )


def check_prediction(prediction: str) -> str:
    """Validates a parameterisation name: 'eps', 'x0' or 'v'."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")
    return prediction


def to_x0_and_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, output: jax.Array, prediction: str
) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) implied by a network ``output`` that predicts ``prediction`` ('eps', 'x0' or 'v')."""
    check_prediction(prediction)
    if prediction == "eps":
        return predict_x0_from_eps(schedule, x_t, t, output), output
    if prediction == "x0":
        return output, predict_eps_from_x0(schedule, x_t, t, output)
    return predict_x0_from_v(schedule, x_t, t, output), predict_eps_from_v(schedule, x_t, t, output)


def training_target(
    schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array, prediction: str
) -> jax.Array:
    """What the network should output for (x_0, t, eps) under ``prediction``."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_target(schedule, x0, t, eps)


# ------------------------------------------------------------------ any process: (alpha, sigma)
# The functions below take alpha and sigma of x_t = alpha x_0 + sigma eps broadcastable against x
# ([B, 1, ...] or scalars), so they serve every noise process (diffusion_jax.processes).

OBJECTIVES = PREDICTIONS + ("flow", "edm")


def check_objective(prediction: str) -> str:
    """Validates a network parameterisation: 'eps', 'x0', 'v', 'flow' (velocity eps - x_0) or 'edm'."""
    if prediction not in OBJECTIVES:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {OBJECTIVES}.")
    return prediction


def edm_preconditioning(
    sigma: jax.Array, sigma_data: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in, c_noise) of Karras et al. (2022) Table 1 at noise level ``sigma``.

    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    """
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data * jax.lax.rsqrt(total)
    c_in = jax.lax.rsqrt(total)
    return c_skip, c_out, c_in, 0.25 * jnp.log(sigma)


def network_input_scale(
    alpha: jax.Array, sigma: jax.Array, prediction: str, kind: str, sigma_data: float = 0.5
) -> jax.Array | None:
    """What x_t is multiplied by before the network sees it (None: not scaled).

    ``edm``: c_in / alpha (EDM's preconditioning of y = x / alpha). On the ``edm`` (VE) process the
    other parameterisations see x_t / sqrt(alpha^2 + sigma^2), the VP image of the same noise level;
    VP and flow inputs are not scaled.
    """
    if prediction == "edm":
        return jax.lax.rsqrt(sigma**2 + (alpha * sigma_data) ** 2)
    if kind == "edm":
        return jax.lax.rsqrt(alpha**2 + sigma**2)
    return None


def x0_eps_from_output(
    output: jax.Array,
    x_t: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    prediction: str,
    sigma_data: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """(x_0, eps) implied by a network ``output`` under ``prediction`` at x_t = alpha x_0 + sigma eps.

    eps: x_0 = (x_t - sigma eps) / alpha. x0: eps = (x_t - alpha x_0) / sigma. v = alpha eps -
    sigma x_0 (Salimans & Ho): x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2). flow, u = eps - x_0:
    x_0 = (x_t - sigma u) / (alpha + sigma). edm: x_0 = c_skip y + c_out F with y = x_t / alpha.
    """
    check_objective(prediction)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
    if prediction == "flow":
        norm = alpha + sigma
        return (x_t - sigma * output) / norm, (x_t + alpha * output) / norm
    c_skip, c_out, _, _ = edm_preconditioning(sigma / alpha, sigma_data)
    x0 = c_skip * (x_t / alpha) + c_out * output
    return x0, (x_t - alpha * x0) / sigma


def output_target(
    x0: jax.Array,
    eps: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    prediction: str,
    sigma_data: float = 0.5,
) -> jax.Array:
    """What the network should output for (x_0, eps) at (alpha, sigma): the inverse of
    :func:`x0_eps_from_output` (eps; x_0; alpha eps - sigma x_0; eps - x_0; (x_0 - c_skip y) / c_out)."""
    check_objective(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    c_skip, c_out, _, _ = edm_preconditioning(sigma / alpha, sigma_data)
    y = x0 + (sigma / alpha) * eps
    return (x0 - c_skip * y) / c_out


def x0_sensitivity(
    alpha: jax.Array, sigma: jax.Array, prediction: str, sigma_data: float = 0.5
) -> jax.Array:
    """|d x_0 / d output| under ``prediction``: an error e in the output is an x_0 error k e.

    eps: sigma / alpha; x0: 1; v: sigma / (alpha^2 + sigma^2); flow: sigma / (alpha + sigma); edm:
    c_out. Min-SNR weighting multiplies the output loss by min(SNR, gamma) k^2.
    """
    check_objective(prediction)
    if prediction == "eps":
        return sigma / alpha
    if prediction == "x0":
        return jnp.ones_like(sigma)
    if prediction == "v":
        return sigma / (alpha**2 + sigma**2)
    if prediction == "flow":
        return sigma / (alpha + sigma)
    return edm_preconditioning(sigma / alpha, sigma_data)[1]
