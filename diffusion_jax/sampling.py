"""Reverse-process samplers, each compiled as one program: ``make_sampler(...) -> sample``.

The denoiser is any function ``denoise_fn(params, x_t, t, **model_kwargs) -> output`` where
``output`` predicts eps, x_0 or v (and, for learned variance, carries the variance interpolation
as extra channels). ``t`` is int32 [B] of 0-based timesteps (0 = the paper's t = 1, least noisy).

A sampler walks the (possibly respaced) schedule from index S-1 down to 0 inside one
``jax.lax.scan``, drawing the step-i noise from ``fold_in(rng, i)``; its compile time does not grow
with the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import forward
from diffusion_jax.schedules import Schedule, respace, space_timesteps

DenoiseFn = Callable[..., jax.Array]
SAMPLERS = ("ddpm", "ddim")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


class MeanVariance(NamedTuple):
    """The reverse-step Gaussian p(x_{t-1} | x_t) and the predictions it was built from ([B, ...])."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


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
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    if variance == "learned_range":
        if output.shape[:-1] != x_t.shape[:-1] or output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"learned_range variance needs a model output of shape {x_t.shape[:-1] + (2 * x_t.shape[-1],)} "
                f"(prediction and variance channels), got {output.shape}."
            )
        output, var_values = jnp.split(output, 2, axis=-1)
        min_log = forward.extract(schedule.posterior_log_variance_clipped, t, x_t)
        max_log = forward.extract(jnp.log(schedule.betas), t, x_t)
        frac = (var_values + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        model_variance = jnp.exp(log_variance)
    else:
        if output.shape != x_t.shape:
            raise ValueError(
                f"model output shape {output.shape} must equal x_t shape {x_t.shape} with "
                f"variance={variance!r}; a learned-variance network needs variance='learned_range'."
            )
        if variance == "fixed_small":
            model_variance = forward.extract(schedule.posterior_variance, t, x_t)
            log_variance = forward.extract(schedule.posterior_log_variance_clipped, t, x_t)
        else:
            large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
            model_variance = forward.extract(large, t, x_t)
            log_variance = jnp.log(model_variance)
        model_variance = jnp.broadcast_to(model_variance, x_t.shape)
        log_variance = jnp.broadcast_to(log_variance, x_t.shape)

    pred_x0, pred_eps = forward.to_x0_and_eps(
        schedule, x_t, t, output.astype(x_t.dtype), prediction
    )
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = forward.predict_eps_from_x0(schedule, x_t, t, pred_x0)
    mean, _, _ = forward.q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return MeanVariance(mean, model_variance, log_variance, pred_x0, pred_eps)


def ddpm_step(
    schedule: Schedule,
    output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2): returns (x_{t-1}, x0_hat).

    x_{t-1} = mu_theta(x_t, t) + sigma_t z with z = ``noise``, except at t = 0 where no noise is added.
    """
    mv = p_mean_variance(
        schedule,
        output,
        x_t,
        t,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
    )
    nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mv.mean + nonzero * jnp.exp(0.5 * mv.log_variance) * noise, mv.pred_x0


def ddim_step(
    schedule: Schedule,
    output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    eta: float = 0.0,
    prediction: str = "eps",
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step x_t -> x_{t-1} on ``schedule`` (Song et al. 2021 eq. 12): returns (x_{t-1}, x0_hat).

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z with
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}). A learned
    variance channel in ``output`` is ignored.
    """
    if output.shape[-1] == 2 * x_t.shape[-1] and output.shape[:-1] == x_t.shape[:-1]:
        output = jnp.split(output, 2, axis=-1)[0]
    mv = p_mean_variance(
        schedule, output, x_t, t, prediction=prediction, clip_denoised=clip_denoised
    )
    abar = forward.extract(schedule.alphas_cumprod, t, x_t)
    abar_prev = forward.extract(schedule.alphas_cumprod_prev, t, x_t)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    mean = (
        jnp.sqrt(abar_prev) * mv.pred_x0
        + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * mv.pred_eps
    )
    return mean + sigma * noise, mv.pred_x0


def sampling_schedule(
    schedule: Schedule, num_steps: int | None = None, spacing: str = "uniform"
) -> Schedule:
    """The schedule a sampler walks: ``schedule`` itself, or respaced to ``num_steps`` steps."""
    if num_steps is None or num_steps == schedule.num_timesteps:
        return schedule
    return respace(schedule, space_timesteps(schedule.num_timesteps, num_steps, spacing))


def _trajectory_slots(num_steps: int, trajectory_steps: Sequence[int] | None) -> np.ndarray | None:
    """Maps each sampler index to its slot in the trajectory buffer (-1: not recorded)."""
    if trajectory_steps is None:
        return None
    steps = np.asarray(trajectory_steps, dtype=np.int64)
    if steps.ndim != 1 or steps.size == 0 or np.any(steps < 0) or np.any(steps >= num_steps):
        raise ValueError(
            f"trajectory_steps must be a non-empty list of sampler step indices in [0, {num_steps - 1}], "
            f"got {trajectory_steps!r}."
        )
    if len(np.unique(steps)) != steps.size:
        raise ValueError(f"trajectory_steps repeats an index: {trajectory_steps!r}.")
    slots = np.full((num_steps,), -1, np.int32)
    slots[steps] = np.arange(steps.size, dtype=np.int32)
    return slots


def make_sampler(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    spacing: str = "uniform",
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    eta: float = 0.0,
    trajectory_steps: Sequence[int] | None = None,
) -> Callable[..., Any]:
    """Builds ``sample(params, rng, shape, **model_kwargs) -> x_0`` [*shape], a pure jittable function.

    ``sampler``: ``ddpm`` (ancestral, Algorithm 2, with ``variance`` fixed_small / fixed_large /
    learned_range) or ``ddim`` (with ``eta``; 0 is deterministic). ``num_steps`` respaces the schedule
    to that many steps (``spacing`` as in :func:`space_timesteps`); None uses all T. ``clip_denoised``
    clips x0_hat to [-1, 1] at each step (for image data). ``model_kwargs`` (e.g. class labels ``y``)
    are passed to ``denoise_fn`` unchanged at every step.

    With ``trajectory_steps`` (indices i of the sampler's steps, S-1 = first), ``sample`` returns
    ``(x_0, frames, x0_preds)``: ``frames[k]`` is x_i, the input of step ``trajectory_steps[k]``, and
    ``x0_preds[k]`` that step's predicted x_0; both [K, *shape].
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    forward.check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    steps_schedule = sampling_schedule(schedule, num_steps, spacing)
    num_sampler_steps = steps_schedule.num_timesteps
    slots = _trajectory_slots(num_sampler_steps, trajectory_steps)

    def step(x, i, output, noise):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        if sampler == "ddpm":
            return ddpm_step(
                steps_schedule,
                output,
                x,
                t,
                noise,
                prediction=prediction,
                variance=variance,
                clip_denoised=clip_denoised,
            )
        return ddim_step(
            steps_schedule,
            output,
            x,
            t,
            noise,
            eta=eta,
            prediction=prediction,
            clip_denoised=clip_denoised,
        )

    def sample(params: Any, rng: jax.Array, shape: Sequence[int], **model_kwargs: Any):
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be (batch, ...) with at least 2 axes, got {shape}.")
        init_rng, loop_rng = jax.random.split(rng)
        x_init = jax.random.normal(init_rng, shape, jnp.float32)
        batch_t = lambda i: jnp.full((shape[0],), steps_schedule.model_timesteps[i], jnp.int32)

        def body(carry, i):
            x, frames, preds = carry
            output = denoise_fn(params, x, batch_t(i), **model_kwargs)
            noise = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
            x_next, pred_x0 = step(x, i, output, noise)
            if slots is not None:
                slot = jnp.asarray(slots)[i]
                record = lambda buf, v: jax.lax.cond(
                    slot >= 0,
                    lambda b: jax.lax.dynamic_update_index_in_dim(b, v, slot, 0),
                    lambda b: b,
                    buf,
                )
                frames, preds = record(frames, x), record(preds, pred_x0)
            return (x_next.astype(jnp.float32), frames, preds), None

        if slots is None:
            frames = preds = jnp.zeros((0,), jnp.float32)
        else:
            frames = preds = jnp.zeros((len(trajectory_steps),) + shape, jnp.float32)
        indices = jnp.arange(num_sampler_steps - 1, -1, -1, dtype=jnp.int32)
        (x0, frames, preds), _ = jax.lax.scan(body, (x_init, frames, preds), indices)
        if slots is None:
            return x0
        return x0, frames, preds

    return sample
