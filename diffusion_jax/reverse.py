"""The reverse process p(x_{t-1} | x_t) of the discrete VP process (Ho et al. 2020 sec. 3.2;
Nichol & Dhariwal 2021 sec. 3.1), shared by the losses, the likelihood and the ancestral sampler.

``t`` is int [B] of 0-based timesteps (see :mod:`diffusion_jax.schedules`); arrays are [B, ...].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import forward
from diffusion_jax.schedules import Schedule

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


class MeanVariance(NamedTuple):
    """The reverse-step Gaussian p(x_{t-1} | x_t) and the predictions it was built from ([B, ...])."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


def check_variance(variance: str) -> str:
    """Validates a reverse-variance name: 'fixed_small', 'fixed_large' or 'learned_range'."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    return variance


def learned_log_variance(
    var_output: jax.Array, min_log: jax.Array, max_log: jax.Array
) -> jax.Array:
    """Nichol & Dhariwal eq. 15: log Sigma = frac log beta + (1 - frac) log beta-tilde, frac = (v + 1) / 2."""
    frac = (var_output + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def reverse_variance(
    schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array, variance: str
) -> tuple[jax.Array, jax.Array]:
    """Variance and log-variance [B, ...] of p(x_{t-1} | x_t) under ``variance`` (see p_mean_variance)."""
    check_variance(variance)
    if variance == "learned_range":
        if output.shape[:-1] != x_t.shape[:-1] or output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"learned_range variance needs a model output of shape {x_t.shape[:-1] + (2 * x_t.shape[-1],)} "
                f"(prediction and variance channels), got {output.shape}."
            )
        var_values = jnp.split(output, 2, axis=-1)[1].astype(x_t.dtype)
        min_log = forward.extract(schedule.posterior_log_variance_clipped, t, x_t)
        max_log = forward.extract(jnp.log(schedule.betas), t, x_t)
        log_variance = learned_log_variance(var_values, min_log, max_log)
        return jnp.exp(log_variance), log_variance
    if variance == "fixed_small":
        var = forward.extract(schedule.posterior_variance, t, x_t)
        log_var = forward.extract(schedule.posterior_log_variance_clipped, t, x_t)
    else:  # fixed_large: beta_t, with beta-tilde_1 at t = 0 (improved-DDPM)
        var = forward.extract(
            jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]), t, x_t
        )
        log_var = jnp.log(var)
    return jnp.broadcast_to(var, x_t.shape), jnp.broadcast_to(log_var, x_t.shape)


def p_mean_variance(
    schedule: Schedule,
    output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> MeanVariance:
    """p(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_hat), Sigma_t) from a network output (Ho et al. sec. 3.2).

    ``variance``: ``fixed_small`` is beta-tilde_t (posterior variance), ``fixed_large`` is beta_t
    (beta-tilde_1 at t = 0), ``learned_range`` interpolates their logs with the output's second half of
    channels, v in [-1, 1] (Nichol & Dhariwal eq. 15). ``clip_denoised`` clips x0_hat to [-1, 1]
    before forming the mean; ``pred_eps`` is then re-derived from the clipped x0_hat.
    """
    model_variance, log_variance = reverse_variance(schedule, output, x_t, t, variance)
    if variance == "learned_range":
        output = jnp.split(output, 2, axis=-1)[0]
    elif output.shape != x_t.shape:
        raise ValueError(
            f"model output shape {output.shape} must equal x_t shape {x_t.shape} with "
            f"variance={variance!r}; a learned-variance network needs variance='learned_range'."
        )
    pred_x0, pred_eps = forward.to_x0_and_eps(
        schedule, x_t, t, output.astype(x_t.dtype), prediction
    )
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = forward.predict_eps_from_x0(schedule, x_t, t, pred_x0)
    mean, _, _ = forward.q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return MeanVariance(mean, model_variance, log_variance, pred_x0, pred_eps)
