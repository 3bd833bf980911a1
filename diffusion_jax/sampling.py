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
from diffusion_jax.schedules import SPACINGS, Schedule, karras_timesteps, respace, space_timesteps

DenoiseFn = Callable[..., jax.Array]
ODE_SAMPLERS = ("euler", "heun", "dpm_solver_2m")
SAMPLERS = ("ddpm", "ddim") + ODE_SAMPLERS
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
    model_variance, log_variance = _reverse_variance(schedule, output, x_t, t, variance)
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


def _reverse_variance(
    schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array, variance: str
) -> tuple[jax.Array, jax.Array]:
    """Variance and log-variance [B, ...] of p(x_{t-1} | x_t) under ``variance`` (see p_mean_variance)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    if variance == "learned_range":
        if output.shape[:-1] != x_t.shape[:-1] or output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"learned_range variance needs a model output of shape {x_t.shape[:-1] + (2 * x_t.shape[-1],)} "
                f"(prediction and variance channels), got {output.shape}."
            )
        var_values = jnp.split(output, 2, axis=-1)[1].astype(x_t.dtype)
        min_log = forward.extract(schedule.posterior_log_variance_clipped, t, x_t)
        max_log = forward.extract(jnp.log(schedule.betas), t, x_t)
        frac = (var_values + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
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


def sampling_schedule(
    schedule: Schedule, num_steps: int | None = None, spacing: str = "uniform"
) -> Schedule:
    """The schedule a sampler walks: ``schedule`` itself, or respaced to ``num_steps`` steps.

    ``spacing`` is one of :data:`SPACINGS` or ``"karras"`` (noise levels by Karras et al. eq. 5).
    """
    if spacing == "karras":
        if num_steps is None:
            num_steps = schedule.num_timesteps
        return respace(schedule, karras_timesteps(schedule, num_steps))
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS + ('karras',)}.")
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


class _Chain(NamedTuple):
    """A sampler's reverse chain: its (respaced) schedule, the scan over its steps, and one step."""

    schedule: Schedule
    run: Callable[..., Any]  # run(params, rng, x_start, first, post_step=None, context=None, **kw)
    step: Callable[..., Any]  # step(params, x, i, key, aux, model_kwargs) -> (x_next, x0_hat, aux)


def _vp_coefficients(schedule: Schedule, t: jax.Array, x: jax.Array):
    """(alpha, sigma, alpha_next, sigma_next) of x_t = alpha x_0 + sigma eps at steps t and t - 1."""
    abar = forward.extract(schedule.alphas_cumprod, t, x)
    abar_next = forward.extract(schedule.alphas_cumprod_prev, t, x)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar), jnp.sqrt(abar_next), jnp.sqrt(1.0 - abar_next)


def _make_chain(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    *,
    sampler: str,
    num_steps: int | None,
    spacing: str | None,
    prediction: str,
    variance: str,
    clip_denoised: bool,
    eta: float,
    cond_fn: Callable[..., jax.Array] | None,
    trajectory_steps: Sequence[int] | None,
) -> _Chain:
    """Validates the options and builds the scan over the sampler's steps (shared by all entry points)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    forward.check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    if spacing is None:
        spacing = "karras" if sampler in ODE_SAMPLERS else "uniform"
    steps_schedule = sampling_schedule(schedule, num_steps, spacing)
    num_sampler_steps = steps_schedule.num_timesteps
    slots = _trajectory_slots(num_sampler_steps, trajectory_steps)

    def predict(params, x, i, model_kwargs):
        """(model output, x0_hat, eps_hat) at sampler index i, with guidance applied."""
        shape, batch = x.shape, x.shape[0]
        t = jnp.full((batch,), i, jnp.int32)
        model_t = jnp.full((batch,), steps_schedule.model_timesteps[i], jnp.int32)
        output = denoise_fn(params, x, model_t, **model_kwargs)
        mean_output = output
        if output.shape[:-1] == shape[:-1] and output.shape[-1] == 2 * shape[-1]:
            mean_output = jnp.split(output, 2, axis=-1)[0]
        elif output.shape != shape:
            raise ValueError(
                f"model output shape {output.shape} must equal the sample shape {shape} "
                f"(or have twice its channels, for learned variance)."
            )
        x0, eps = forward.to_x0_and_eps(
            steps_schedule, x, t, mean_output.astype(x.dtype), prediction
        )
        if cond_fn is not None and sampler != "ddpm":
            # Classifier guidance in score form (Dhariwal & Nichol Algorithm 2).
            grad = cond_fn(params, x, model_t, **model_kwargs)
            eps = eps - forward.extract(steps_schedule.sqrt_one_minus_alphas_cumprod, t, x) * grad
            x0 = forward.predict_x0_from_eps(steps_schedule, x, t, eps)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = forward.predict_eps_from_x0(steps_schedule, x, t, x0)
        return output, x0, eps

    def step(params, x, i, key, aux, model_kwargs):
        """One step x_i -> x_{i-1}: returns (x_{i-1}, x0_hat, aux); aux is the solver's history."""
        t = jnp.full((x.shape[0],), i, jnp.int32)
        output, x0, eps = predict(params, x, i, model_kwargs)
        if sampler == "ddpm":
            var, log_var = _reverse_variance(steps_schedule, output, x, t, variance)
            mean, _, _ = forward.q_posterior_mean_variance(steps_schedule, x0, x, t)
            if cond_fn is not None:  # Dhariwal & Nichol Algorithm 1: shift the mean by Sigma grad
                model_t = jnp.full_like(t, steps_schedule.model_timesteps[i])
                mean = mean + var * cond_fn(params, x, model_t, **model_kwargs)
            noise = jax.random.normal(key, x.shape, jnp.float32)
            return mean + (i > 0).astype(x.dtype) * jnp.exp(0.5 * log_var) * noise, x0, aux
        alpha, sigma, alpha_next, sigma_next = _vp_coefficients(steps_schedule, t, x)
        if (
            sampler == "ddim"
        ):  # Song et al. eq. 12, written with alpha = sqrt(abar), sigma = sqrt(1 - abar)
            sig = eta * (sigma_next / sigma) * jnp.sqrt(1.0 - (alpha / alpha_next) ** 2)
            direction = jnp.sqrt(jnp.maximum(sigma_next**2 - sig**2, 0.0))
            noise = jax.random.normal(key, x.shape, jnp.float32)
            return alpha_next * x0 + direction * eps + sig * noise, x0, aux
        # The ODE samplers work on y = x / alpha at noise level s = sigma / alpha, where dy/ds = eps.
        h = sigma_next / alpha_next - sigma / alpha
        if sampler == "euler":  # Karras et al. Algorithm 1
            return alpha_next * (x / alpha + h * eps), x0, aux
        if sampler == "heun":  # Karras et al. Algorithm 2 without churn: Euler at the last step

            def trapezoid(_):
                _, _, eps_next = predict(
                    params, alpha_next * (x / alpha + h * eps), i - 1, model_kwargs
                )
                return x / alpha + h * 0.5 * (eps + eps_next)

            y_next = jax.lax.cond(i > 0, trapezoid, lambda _: x / alpha + h * eps, None)
            return alpha_next * y_next, x0, aux
        # dpm_solver_2m: Lu et al. (2022) DPM-Solver++(2M); first order at the first and last steps.
        x0_prev, h_prev, has_prev = aux
        lam = jnp.log(alpha / sigma)
        lam_next = jnp.log(alpha_next / jnp.where(i > 0, sigma_next, 1.0))
        h_lam = lam_next - lam
        r = h_prev / h_lam
        second = jnp.logical_and(has_prev, i > 0)
        d = jnp.where(second, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
        exp_neg_h = (sigma_next * alpha) / (
            alpha_next * sigma
        )  # e^{-h}, exactly 0 at the last step
        x_next = (sigma_next / sigma) * x - alpha_next * (exp_neg_h - 1.0) * d
        return x_next, x0, (x0, h_lam, jnp.ones((), bool))

    def run(params, rng, x_start, first: int, post_step=None, context=None, **model_kwargs):
        """Runs steps ``first, first - 1, ..., 0`` from ``x_start``; returns x_0 (and frames)."""
        shape = x_start.shape

        def body(carry, i):
            x, aux, frames, preds = carry
            key = jax.random.fold_in(rng, i)
            x_next, x0, aux = step(params, x, i, key, aux, model_kwargs)
            if post_step is not None:
                x_next = post_step(x_next, i, jax.random.fold_in(key, 1), context)
            if slots is not None:
                slot = jnp.asarray(slots)[i]
                record = lambda buf, v: jax.lax.cond(
                    slot >= 0,
                    lambda b: jax.lax.dynamic_update_index_in_dim(b, v, slot, 0),
                    lambda b: b,
                    buf,
                )
                frames, preds = record(frames, x), record(preds, x0)
            return (x_next.astype(jnp.float32), aux, frames, preds), None

        h_shape = shape[:1] + (1,) * (len(shape) - 1)
        aux = (jnp.zeros(shape, jnp.float32), jnp.ones(h_shape, jnp.float32), jnp.zeros((), bool))
        if slots is None:
            frames = preds = jnp.zeros((0,), jnp.float32)
        else:
            frames = preds = jnp.zeros((len(trajectory_steps),) + shape, jnp.float32)
        indices = jnp.arange(first, -1, -1, dtype=jnp.int32)
        carry = (x_start.astype(jnp.float32), aux, frames, preds)
        (x0, _, frames, preds), _ = jax.lax.scan(body, carry, indices)
        return x0 if slots is None else (x0, frames, preds)

    return _Chain(steps_schedule, run, step)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (batch, ...) with at least 2 axes, got {shape}.")
    return shape


def make_sampler(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    spacing: str | None = None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    eta: float = 0.0,
    cond_fn: Callable[..., jax.Array] | None = None,
    trajectory_steps: Sequence[int] | None = None,
) -> Callable[..., Any]:
    """Builds ``sample(params, rng, shape, **model_kwargs) -> x_0`` [*shape], a pure jittable function.

    ``sampler``:
      - ``ddpm``: ancestral (Ho et al. Algorithm 2), ``variance`` fixed_small / fixed_large /
        learned_range (the network's extra channels, improved-DDPM);
      - ``ddim``: Song et al. eq. 12 with ``eta`` (0 is deterministic, 1 is ancestral-like);
      - ``euler`` / ``heun``: the probability-flow ODE in Karras et al.'s noise levels (Algorithms 1
        and 2; ``heun`` costs two evaluations per step but the last);
      - ``dpm_solver_2m``: DPM-Solver++(2M) (Lu et al. 2022), one evaluation per step.
    ``num_steps`` respaces the schedule to that many steps; ``spacing`` is "uniform" | "leading" |
    "trailing" | "quadratic" | "karras" (default: karras for the ODE samplers, uniform otherwise).
    ``clip_denoised`` clips x0_hat to [-1, 1] at each step (for image data). ``cond_fn(params, x_t,
    t, **model_kwargs)`` returns a scaled gradient of log p(y | x_t) for classifier guidance (see
    :func:`classifier_guidance`). ``model_kwargs`` (class labels ``y``, a ``guidance_scale``, ...) are
    passed to ``denoise_fn`` (and ``cond_fn``) unchanged at every step.

    With ``trajectory_steps`` (indices i of the sampler's steps, S-1 = first), ``sample`` returns
    ``(x_0, frames, x0_preds)``: ``frames[k]`` is x_i, the input of step ``trajectory_steps[k]``, and
    ``x0_preds[k]`` that step's predicted x_0; both [K, *shape].
    """
    chain = _make_chain(
        denoise_fn, schedule, sampler=sampler, num_steps=num_steps, spacing=spacing,
        prediction=prediction, variance=variance, clip_denoised=clip_denoised, eta=eta,
        cond_fn=cond_fn, trajectory_steps=trajectory_steps,
    )  # fmt: skip
    last = chain.schedule.num_timesteps - 1

    def sample(params: Any, rng: jax.Array, shape: Sequence[int], **model_kwargs: Any):
        shape = _check_shape(shape)
        init_rng, loop_rng = jax.random.split(rng)
        x_init = jax.random.normal(init_rng, shape, jnp.float32)
        return chain.run(params, loop_rng, x_init, last, **model_kwargs)

    return sample


def _editing_options(
    sampler_kwargs: dict[str, Any], allow_trajectory_key: bool = False
) -> dict[str, Any]:
    """make_sampler's options with ``sampler_kwargs`` applied, for the editing entry points (no trajectory)."""
    options = dict(sampler="ddpm", num_steps=None, spacing=None, prediction="eps")
    options.update(variance="fixed_small", clip_denoised=True, eta=0.0, cond_fn=None)
    unknown = (
        set(sampler_kwargs)
        - set(options)
        - ({"trajectory_steps"} if allow_trajectory_key else set())
    )
    if unknown:
        raise ValueError(f"unknown sampler options {sorted(unknown)}.")
    options.update(sampler_kwargs, trajectory_steps=None)
    return options


def make_img2img(
    denoise_fn: DenoiseFn, schedule: Schedule, *, strength: float, **sampler_kwargs: Any
) -> Callable[..., Any]:
    """Builds ``edit(params, rng, images, **model_kwargs) -> images`` (SDEdit, Meng et al. 2022).

    The images ([B, ...], in [-1, 1]) are noised by q_sample to the sampler step nearest
    ``strength * S`` (strength in [0, 1]; 0 returns the input, 1 starts from almost pure noise),
    then denoised by the sampler ``sampler_kwargs`` describes (as for :func:`make_sampler`).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    if sampler_kwargs.get("trajectory_steps") is not None:
        raise ValueError("trajectory_steps is not supported by make_img2img.")
    options = _editing_options(sampler_kwargs, allow_trajectory_key=True)
    chain = _make_chain(denoise_fn, schedule, **options)
    num_steps = int(round(strength * chain.schedule.num_timesteps))

    def edit(params: Any, rng: jax.Array, images: jax.Array, **model_kwargs: Any):
        images = jnp.asarray(images, jnp.float32)
        _check_shape(images.shape)
        if num_steps == 0:
            return images
        noise_rng, loop_rng = jax.random.split(rng)
        first = num_steps - 1
        t = jnp.full((images.shape[0],), first, jnp.int32)
        noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
        x_start = forward.q_sample(chain.schedule, images, t, noise)
        return chain.run(params, loop_rng, x_start, first, **model_kwargs)

    return edit


def make_inpainter(
    denoise_fn: DenoiseFn, schedule: Schedule, *, resample: int = 1, **sampler_kwargs: Any
) -> Callable[..., Any]:
    """Builds ``inpaint(params, rng, images, mask, **model_kwargs) -> images``.

    ``mask`` (broadcastable to ``images``) is 1 where the image is known. After every reverse step
    x_i -> x_{i-1} the known region is replaced by the original noised to step i - 1 with q_sample
    (and by the original itself after the last step), so only the unknown region is generated.
    ``resample > 1`` repeats each step that many times, going back up one step with
    q(x_i | x_{i-1}) in between (RePaint, Lugmayr et al. 2022, jump length 1), to harmonise the regions.
    ``sampler_kwargs`` are those of :func:`make_sampler`.
    """
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}.")
    options = _editing_options(sampler_kwargs)
    if resample > 1 and options["sampler"] == "dpm_solver_2m":
        raise ValueError("resample > 1 needs a one-step sampler; dpm_solver_2m keeps a history.")
    chain = _make_chain(denoise_fn, schedule, **options)
    sched = chain.schedule
    last = sched.num_timesteps - 1

    def known_at(images, i, key):
        """The known image noised to sampler step i - 1 (the clean image once i = 0)."""
        t_prev = jnp.full((images.shape[0],), jnp.maximum(i - 1, 0), jnp.int32)
        noised = forward.q_sample(sched, images, t_prev, jax.random.normal(key, images.shape))
        return jnp.where(i > 0, noised, images)

    def inpaint(
        params: Any, rng: jax.Array, images: jax.Array, mask: jax.Array, **model_kwargs: Any
    ):
        images = jnp.asarray(images, jnp.float32)
        _check_shape(images.shape)
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), images.shape)
        init_rng, loop_rng = jax.random.split(rng)
        x_init = jax.random.normal(init_rng, images.shape, jnp.float32)

        def replace_known(x_next, i, key, ctx):
            imgs, m = ctx
            return m * known_at(imgs, i, key) + (1.0 - m) * x_next

        if resample == 1:
            return chain.run(
                params, loop_rng, x_init, last, replace_known, (images, mask), **model_kwargs
            )

        # RePaint: each step i runs `resample` times; between repeats x_{i-1} goes back up to x_i.
        def body(x, i):
            def repeat(r, x):
                key = jax.random.fold_in(jax.random.fold_in(loop_rng, i), r)
                x_prev, _, _ = chain.step(params, x, i, key, None, model_kwargs)
                x_prev = replace_known(x_prev, i, jax.random.fold_in(key, 1), (images, mask))
                beta = sched.betas[i]
                up = jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * jax.random.normal(
                    jax.random.fold_in(key, 2), x.shape
                )
                return jnp.where(jnp.logical_and(r < resample - 1, i > 0), up, x_prev)

            return jax.lax.fori_loop(0, resample, repeat, x), None

        x0, _ = jax.lax.scan(body, x_init, jnp.arange(last, -1, -1, dtype=jnp.int32))
        return x0

    return inpaint


def classifier_free_guidance(denoise_fn: DenoiseFn, null_label: int) -> DenoiseFn:
    """Wraps a class-conditional denoiser for classifier-free guidance (Ho & Salimans 2022).

    The result is ``guided(params, x_t, t, *, y, guidance_scale=1.0, **kw)`` returning
    uncond + guidance_scale * (cond - uncond), with both evaluations batched into one call of
    ``denoise_fn(params, x, t, y=..., **kw)`` (``null_label`` is the "no class" label). Scale 0 is the
    unconditional model, 1 the conditional one. A learned-variance channel half is taken from the
    conditional evaluation unguided.
    """

    def guided(params, x_t, t, *, y, guidance_scale=1.0, **kwargs):
        # (1 - w) uncond + w cond == uncond + w (cond - uncond), exact at w = 0 and w = 1.
        mix = lambda cond, uncond: (1.0 - guidance_scale) * uncond + guidance_scale * cond
        batch = x_t.shape[0]
        y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
        both = denoise_fn(
            params,
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            y=jnp.concatenate([y, jnp.full_like(y, null_label)]),
            **kwargs,
        )
        cond, uncond = both[:batch], both[batch:]
        if cond.shape[-1] == 2 * x_t.shape[-1]:
            (c_mean, c_var), (u_mean, _) = jnp.split(cond, 2, -1), jnp.split(uncond, 2, -1)
            return jnp.concatenate([mix(c_mean, u_mean), c_var], -1)
        return mix(cond, uncond)

    return guided


def classifier_guidance(
    classifier_fn: Callable[..., jax.Array], scale: float
) -> Callable[..., jax.Array]:
    """``cond_fn`` for :func:`make_sampler`: ``scale`` * grad_x log p(y | x_t) from a noise-aware classifier.

    ``classifier_fn(params, x_t, t) -> logits [B, num_classes]``; the sampler passes its ``params``
    (e.g. a dict holding both networks' parameters) and the ``y`` labels given to ``sample``.
    """

    def cond_fn(params, x_t, t, *, y, **_):
        def log_prob(x):
            logits = classifier_fn(params, x, t).astype(jnp.float32)
            log_p = jax.nn.log_softmax(logits, axis=-1)
            return jnp.sum(jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=-1))

        return scale * jax.grad(log_prob)(x_t)

    return cond_fn
