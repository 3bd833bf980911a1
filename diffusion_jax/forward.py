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
