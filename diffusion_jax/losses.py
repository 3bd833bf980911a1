"""Training losses and the pieces of the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

Shapes: ``x0`` is [B, ...] data scaled to [-1, 1]; on the discrete VP process (a :class:`Schedule`)
``t`` is int [B] of 0-based timesteps, on the others float [B] in the process's time. Per-example
results are [B]; bits are per dimension (``mean`` over every non-batch axis, divided by log 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffusion_jax import forward
from diffusion_jax.processes import Process, as_process, sample_training_times
from diffusion_jax.reverse import p_mean_variance
from diffusion_jax.schedules import Schedule

LOSS_TYPES = ("l2", "l1")


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def min_snr_weight(snr: jax.Array, gamma: float, prediction: str) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss on ``prediction``'s target.

    The weight makes the loss equal to min(SNR_t, gamma) times the x_0-MSE: divide by SNR for eps,
    by SNR + 1 for v, and 1 for x_0.
    """
    clipped = jnp.minimum(snr, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1.0)
    return clipped


def noised_inputs(
    schedule: Schedule,
    x0: jax.Array,
    rng: jax.Array,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t, eps, x_t) for a training example: t ~ Uniform{0..T-1} [B], eps ~ N(0, I), x_t by q_sample.

    ``t`` or ``noise`` given are used as they are; the rest is drawn from ``rng``.
    """
    t_rng, noise_rng = jax.random.split(rng)
    if t is None:
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    return t, noise, forward.q_sample(schedule, x0, t, noise)


def _per_example_error(output: jax.Array, target: jax.Array, loss_type: str) -> jax.Array:
    err = output.astype(jnp.float32) - target
    return mean_flat(jnp.square(err) if loss_type == "l2" else jnp.abs(err))


def diffusion_loss(
    process: Process | Schedule,
    model_fn: Callable[..., jax.Array],
    x0: jax.Array,
    rng: jax.Array,
    *,
    prediction: str = "eps",
    loss_type: str = "l2",
    min_snr_gamma: float | None = None,
    time_sampling: str = "uniform",
    time_loc: float = 0.0,
    time_scale: float = 1.0,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    self_condition: bool = False,
    clip_denoised: bool = True,
) -> jax.Array:
    """The denoising loss per example, [B], on any noise process (Ho et al. Algorithm 1 and successors).

    Draws a noise level by ``time_sampling`` (see :func:`processes.sample_training_times`: uniform,
    SD3's logit-normal, EDM's log-normal with ``time_loc``/``time_scale``) and eps ~ N(0, I) from
    ``rng`` (unless ``t`` / ``noise`` are given), forms x_t = alpha x_0 + sigma eps and compares
    ``model_fn(x_in, model_t)`` with the ``prediction`` target (eps, x_0, v, the flow velocity
    eps - x_0, or EDM's F, whose plain MSE is EDM's lambda(sigma)-weighted denoiser loss) by mean
    squared (``l2``) or absolute (``l1``) error, optionally weighted by min-SNR-gamma. ``x_in`` is x_t
    scaled as :func:`forward.network_input_scale` says. On the discrete VP process (a
    :class:`Schedule`) ``t`` is the int step [B], drawn uniformly from 0..T-1 (other samplings are
    snapped to the grid), and ``model_fn`` gets ``schedule.model_timesteps[t]``; elsewhere ``t`` is
    float [B] in the process's time and ``model_fn`` gets :meth:`Process.model_time`.

    ``self_condition``: ``model_fn(x_in, model_t, x_self_cond=...)`` also gets an x_0 estimate,
    [B, ...], as :func:`self_condition_input` draws it (Analog Bits self-conditioning; its x_0 is
    clipped to [-1, 1] with ``clip_denoised``, as the sampler's is). Without it ``model_fn`` is
    called with (x_in, model_t) only, exactly as before.
    """
    forward.check_objective(prediction)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}.")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}.")
    process = as_process(process)
    t_rng, noise_rng = jax.random.split(rng)
    batch = x0.shape[0]
    if t is None and (time_sampling != "uniform" or not process.is_discrete):
        t = sample_training_times(process, t_rng, batch, time_sampling, time_loc, time_scale)
        if process.is_discrete:  # snap to the step whose node (k + 1) / T is nearest above
            T = process.num_timesteps
            t = jnp.clip(jnp.ceil(t * T) - 1, 0, T - 1).astype(jnp.int32)
    if process.is_discrete:
        schedule = process.schedule
        if prediction in forward.PREDICTIONS:  # the DDPM table path, exactly as it always was
            t, noise, x_t = noised_inputs(schedule, x0, rng, t, noise)
            model_t = schedule.model_timesteps[t]
            kwargs = {}
            if self_condition:

                def to_x0(out):
                    _check_output(out, x0)
                    return forward.to_x0_and_eps(schedule, x_t, t, out, prediction)[0]

                kwargs["x_self_cond"] = self_condition_input(
                    model_fn, x_t, model_t, to_x0, rng, clip_denoised=clip_denoised
                )
            output = model_fn(x_t, model_t, **kwargs)
            _check_output(output, x0)
            target = forward.training_target(schedule, x0, t, noise, prediction)
            per_example = _per_example_error(output, target, loss_type)
            if min_snr_gamma is not None:
                per_example = per_example * min_snr_weight(
                    schedule.snr[t], min_snr_gamma, prediction
                )
            return per_example
        if t is None:
            t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps)
        alpha = forward.extract(schedule.sqrt_alphas_cumprod, t, x0)
        sigma = forward.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
        model_t = schedule.model_timesteps[t]
    else:
        t = jnp.asarray(t, jnp.float32)
        alpha, sigma = process.alpha_sigma(t)
        alpha = alpha.reshape((batch,) + (1,) * (x0.ndim - 1))
        sigma = sigma.reshape(alpha.shape)
        model_t = process.model_time(t)
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = alpha * x0 + sigma * noise
    scale = None
    if prediction == "edm" or process.kind == "edm":
        scale = forward.network_input_scale(
            alpha, sigma, prediction, process.kind, process.sigma_data
        )
    x_in = x_t if scale is None else x_t * scale  # the self-conditioning input is not scaled
    kwargs = {}
    if self_condition:
        sigma_data = process.sigma_data

        def to_x0(out):
            _check_output(out, x0)
            return forward.x0_eps_from_output(out, x_t, alpha, sigma, prediction, sigma_data)[0]

        kwargs["x_self_cond"] = self_condition_input(
            model_fn, x_in, model_t, to_x0, rng, clip_denoised=clip_denoised
        )
    output = model_fn(x_in, model_t, **kwargs)
    _check_output(output, x0)
    target = forward.output_target(x0, noise, alpha, sigma, prediction, process.sigma_data)
    per_example = _per_example_error(output, target, loss_type)
    if min_snr_gamma is not None:
        k = forward.x0_sensitivity(alpha, sigma, prediction, process.sigma_data)
        snr = mean_flat(jnp.broadcast_to(jnp.square(alpha / sigma), x0.shape))
        per_example = (
            per_example
            * jnp.minimum(snr, min_snr_gamma)
            * mean_flat(jnp.broadcast_to(jnp.square(k), x0.shape))
        )
    return per_example


def self_condition_input(
    model_fn: Callable[..., jax.Array],
    x_in: jax.Array,
    model_t: jax.Array,
    to_x0: Callable[[jax.Array], jax.Array],
    rng: jax.Array,
    *,
    clip_denoised: bool = True,
) -> jax.Array:
    """The self-conditioning input of a training batch, [B, ...] like ``x_in`` (Chen, Zhang & Hinton
    2022, "Analog Bits", Algorithm 1).

    For a random half of the examples (each Bernoulli(1/2), drawn from ``fold_in(rng, 1)``) the x_0
    estimate ``to_x0(model_fn(x_in, model_t, x_self_cond=0))`` of a first pass without
    self-conditioning, under ``stop_gradient`` and clipped to [-1, 1] with ``clip_denoised``; zeros
    for the others, so the network also learns the first sampling step, which has no estimate yet.
    """
    output = model_fn(x_in, model_t, x_self_cond=jnp.zeros_like(x_in))
    x0_hat = to_x0(output).astype(jnp.float32)
    if clip_denoised:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    batch = x_in.shape[0]
    use = jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5, (batch,))
    use = use.reshape((batch,) + (1,) * (x_in.ndim - 1))
    return jnp.where(use, jax.lax.stop_gradient(x0_hat), 0.0)


def discrete_schedule(process: Process | Schedule, what: str) -> Schedule:
    """The T-step :class:`Schedule` of a discrete VP process; a clear error for any other process."""
    if isinstance(process, Schedule):
        return process
    if not process.is_discrete:
        raise ValueError(
            f"{what} is defined on the discrete VP process (a T-step beta schedule), not on the "
            f"{process.kind!r} process."
        )
    return process.schedule


def _check_output(output: jax.Array, x0: jax.Array) -> None:
    if output.shape != x0.shape:
        raise ValueError(
            f"model output shape {output.shape} must equal the data shape {x0.shape}; a network "
            "with learned variance needs the hybrid loss, not the simple loss."
        )


def hybrid_loss(
    schedule: Schedule,
    model_fn: Callable[..., jax.Array],
    x0: jax.Array,
    rng: jax.Array,
    *,
    prediction: str = "eps",
    lambda_vlb: float = 1e-3,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    self_condition: bool = False,
    clip_denoised: bool = True,
) -> jax.Array:
    """Improved-DDPM's L_hybrid = L_simple + lambda L_vlb per example, [B] (Nichol & Dhariwal sec. 3.1).

    ``model_fn(x_t, t)`` returns [B, ..., 2C]: the ``prediction`` target in the first C channels and
    the variance interpolation v (see :func:`sampling.p_mean_variance`, ``learned_range``) in the
    rest. L_vlb = T * L_t in bits per dimension (the t-th term of the bound, scaled to the sum over
    all T terms), computed with a stop-gradient on the mean so that it trains only the variance.
    ``self_condition`` and ``clip_denoised`` as for :func:`diffusion_loss`.
    """
    schedule = discrete_schedule(schedule, "the hybrid loss (learned variance)")
    forward.check_prediction(prediction)
    t, noise, x_t = noised_inputs(schedule, x0, rng, t, noise)
    model_t = schedule.model_timesteps[t]
    kwargs = {}
    if self_condition:

        def to_x0(out):
            mean_output = jnp.split(out.astype(jnp.float32), 2, axis=-1)[0]
            return forward.to_x0_and_eps(schedule, x_t, t, mean_output, prediction)[0]

        kwargs["x_self_cond"] = self_condition_input(
            model_fn, x_t, model_t, to_x0, rng, clip_denoised=clip_denoised
        )
    output = model_fn(x_t, model_t, **kwargs).astype(jnp.float32)
    if output.shape != x0.shape[:-1] + (2 * x0.shape[-1],):
        raise ValueError(
            f"hybrid_loss needs a learned-variance model output of shape "
            f"{x0.shape[:-1] + (2 * x0.shape[-1],)}, got {output.shape}."
        )
    mean_output, var_output = jnp.split(output, 2, axis=-1)
    target = forward.training_target(schedule, x0, t, noise, prediction)
    mse = mean_flat(jnp.square(mean_output - target))
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
    mv = p_mean_variance(schedule, frozen, x_t, t, prediction=prediction, variance="learned_range")
    vb = vb_term_bpd(schedule, x0, x_t, t, mv.mean, mv.log_variance)
    return mse + lambda_vlb * schedule.num_timesteps * vb


def classifier_loss(
    schedule: Schedule,
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of a noise-aware classifier on x_t ~ q(x_t | x_0), t ~ Uniform: ([B] nats, [B] hits).

    ``logits_fn(x_t, t) -> [B, num_classes]``; what classifier guidance needs is log p(y | x_t), so
    the classifier is trained on the same noised inputs the sampler will show it (Dhariwal & Nichol).
    """
    schedule = discrete_schedule(schedule, "the noise-aware classifier loss")
    t, _, x_t = noised_inputs(schedule, x0, rng, t, noise)
    logits = logits_fn(x_t, schedule.model_timesteps[t])
    if logits.ndim != 2 or logits.shape[0] != x0.shape[0]:
        raise ValueError(
            f"logits must have shape [B, num_classes] with B={x0.shape[0]}, got {logits.shape}."
        )
    labels = jnp.asarray(labels, jnp.int32)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    return nll, (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def _expm1_minus_identity(d: jax.Array) -> jax.Array:
    """exp(d) - 1 - d without cancellation: where |d| < 1/2 its Taylor series sum_{k >= 2} d^k / k!
    (to k = 9, in Horner form; the first term left out is below 3e-9 of the sum), elsewhere
    directly."""
    small = jnp.abs(d) < 0.5
    x = jnp.where(small, d, 0.0)
    series = jnp.ones_like(x)
    for k in range(9, 2, -1):
        series = 1.0 + x / k * series
    return jnp.where(small, 0.5 * x * x * series, jnp.expm1(d) - d)


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    With d = logvar1 - logvar2, KL = (exp(d) - 1 - d + (mean1 - mean2)^2 exp(-logvar2)) / 2, where
    exp(d) - 1 - d is formed without cancellation: exactly 0 for identical Gaussians, and accurate
    to float32 rounding for nearly equal variances (the textbook form's -1 + exp(d) - d is off by
    about 1e-7 nats there).
    """
    d = jnp.asarray(logvar1) - jnp.asarray(logvar2)
    return 0.5 * (_expm1_minus_identity(d) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(
    x: jax.Array, mean: jax.Array, log_scale: jax.Array, *, num_bins: int = 256
) -> jax.Array:
    """log p(x) elementwise, in nats, for x on a grid of ``num_bins`` values spanning [-1, 1].

    The decoder of Ho et al. (eq. 13): the Gaussian N(mean, exp(log_scale)^2) integrated over each
    bin of width 2/(num_bins - 1), with the edge bins extended to -inf and +inf. ``log_scale`` is the
    log standard deviation. Computed with the exact normal CDF (log_ndtr at the edges).
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_std
    lower = (x - mean - half_bin) * inv_std
    edge = 1.0 - half_bin / 2
    return jnp.where(
        x < -edge,
        log_ndtr(upper),  # the lowest bin holds all the mass below it
        jnp.where(x > edge, log_ndtr(-lower), _log_ndtr_difference(upper, lower)),
    )


def _log_ndtr_difference(upper: jax.Array, lower: jax.Array) -> jax.Array:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails.

    Reflects to the side where the larger CDF value is not near 1, then uses
    log(Phi(a) - Phi(b)) = log Phi(a) + log(1 - exp(log Phi(b) - log Phi(a))).
    """
    flip = lower > 0
    a = jnp.where(flip, -lower, upper)
    b = jnp.where(flip, -upper, lower)
    log_a = log_ndtr(a)
    d = jnp.minimum(log_ndtr(b) - log_a, -1e-30)
    # log1mexp(d) = log(1 - e^d), with each branch fed only inputs where it is finite (safe gradients).
    near = d > -math.log(2.0)
    log1mexp = jnp.where(
        near,
        jnp.log(-jnp.expm1(jnp.where(near, d, -1.0))),
        jnp.log1p(-jnp.exp(jnp.where(near, -1.0, d))),
    )
    return log_a + log1mexp


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [B]: the prior term L_T of the bound."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1)
    mean, _, log_variance = forward.q_mean_variance(schedule, x0, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def vb_term_bpd(
    schedule: Schedule,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    model_mean: jax.Array,
    model_log_variance: jax.Array,
) -> jax.Array:
    """One term of the variational bound in bits per dimension, [B].

    For t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (Ho et al. eq. 5). For t = 0
    (the paper's t = 1): the decoder term L_0 = -log p(x_0 | x_1) with the discretized Gaussian,
    for 8-bit data scaled to [-1, 1].
    """
    true_mean, _, true_log_variance = forward.q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    )
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
