"""Bits per dimension from the full variational bound (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021).

For 8-bit data x_0 scaled to the 256-level grid {-1 + 2k/255} in [-1, 1], the negative bound is

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0
      = KL(q(x_T | x_0) || N(0, I))                                   (prior_bpd)
      + sum_t KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))              (vb_bpd[:, 1:])
      - log p(x_0 | x_1)  with the discretized Gaussian decoder          (vb_bpd[:, 0])

in the paper's 1-based notation; in code ``vb_bpd[:, t]`` is the term of 0-based timestep ``t``
(``t = 0`` the decoder). Each term is a single-sample Monte Carlo estimate with x_t = q_sample(x_0,
t, eps), eps drawn from ``fold_in(rng, t)``; the sum over t is exact (all T terms, no subsampling).
An upper bound on the negative log-likelihood in bits/dim: lower is better.

For a continuous process (flow, EDM, or VP with ``discrete=False``), :func:`ode_log_likelihood` gives
the exact log-likelihood of the model's probability-flow ODE (Song et al. 2021, appendix D.2) with
FFJORD's Hutchinson trace estimator (Grathwohl et al. 2019), and :func:`ode_bits_per_dim` its
bits/dim for 8-bit data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import forward
from diffusion_jax.losses import mean_flat, prior_bpd, vb_term_bpd
from diffusion_jax.processes import Process, as_process
from diffusion_jax.reverse import VARIANCES, p_mean_variance
from diffusion_jax.schedules import Schedule

BpdFn = Callable[..., dict[str, jax.Array]]


def make_bpd_fn(
    denoise_fn: Callable[..., jax.Array],
    schedule: Schedule,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> BpdFn:
    """Builds ``bpd(params, rng, x0, **model_kwargs) -> dict`` of the negative bound, pure and jittable.

    ``denoise_fn(params, x_t, t, **model_kwargs)`` is the network as for samplers (it receives
    ``schedule.model_timesteps[t]``); ``variance`` is ``fixed_small`` | ``fixed_large`` |
    ``learned_range`` (then the output carries the variance channels). ``x0`` [B, ...] must lie on the
    8-bit grid in [-1, 1] (see :func:`quantize_8bit`). All T terms run in one ``lax.scan``. Returns
    bits/dim arrays:

    - ``total_bpd`` [B]: prior + sum of ``vb_bpd``, the negative bound;
    - ``prior_bpd`` [B]: L_T; ``vb_bpd`` [B, T]: the term of each 0-based t (t = 0 is the decoder);
    - ``x0_mse`` [B, T], ``eps_mse`` [B, T]: the errors of the predicted x_0 and eps (diagnostics).
    """
    forward.check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    num_timesteps = schedule.num_timesteps

    def bpd(
        params: Any, rng: jax.Array, x0: jax.Array, **model_kwargs: Any
    ) -> dict[str, jax.Array]:
        x0 = jnp.asarray(x0, jnp.float32)
        if x0.ndim < 2:
            raise ValueError(f"x0 must be a batch [B, ...] with at least 2 axes, got {x0.shape}.")
        batch = x0.shape[0]

        def term(_, t):
            noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32)
            tt = jnp.full((batch,), t, jnp.int32)
            x_t = forward.q_sample(schedule, x0, tt, noise)
            output = denoise_fn(params, x_t, schedule.model_timesteps[tt], **model_kwargs)
            mv = p_mean_variance(
                schedule, output.astype(jnp.float32), x_t, tt, prediction=prediction,
                variance=variance, clip_denoised=clip_denoised,
            )  # fmt: skip
            vb = vb_term_bpd(schedule, x0, x_t, tt, mv.mean, mv.log_variance)
            x0_mse = mean_flat(jnp.square(mv.pred_x0 - x0))
            eps_mse = mean_flat(jnp.square(mv.pred_eps - noise))
            return None, (vb, x0_mse, eps_mse)

        _, (vb, x0_mse, eps_mse) = jax.lax.scan(
            term, None, jnp.arange(num_timesteps, dtype=jnp.int32)
        )
        prior = prior_bpd(schedule, x0)
        vb = vb.T  # [T, B] -> [B, T]
        return {
            "total_bpd": prior + jnp.sum(vb, axis=1),
            "prior_bpd": prior,
            "vb_bpd": vb,
            "x0_mse": x0_mse.T,
            "eps_mse": eps_mse.T,
        }

    return bpd


def quantize_8bit(x: np.ndarray | jax.Array) -> np.ndarray:
    """Rounds data in [-1, 1] to the nearest of the 256 levels -1 + 2k/255 (float32, same shape).

    The discretized decoder is a likelihood only for data on that grid; e.g. the 17-level digits
    (0..16) are not on it until quantized.
    """
    k = np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255)
    return (k / 127.5 - 1.0).astype(np.float32)


def evaluate_bpd(
    bpd_fn: BpdFn,
    params: Any,
    rng: jax.Array,
    data: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 64,
    quantize: bool = True,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Bits/dim of a whole held-out set: mean and standard error of the bound, per-timestep means.

    ``data`` is an array [N, ...] (split into batches of ``batch_size``, the last padded and masked so
    that every example counts once and ``bpd_fn`` compiles once) or an iterable of batches.
    Batch ``i`` uses ``fold_in(rng, i)``. ``quantize`` rounds the data to the 8-bit grid first.
    ``labels`` [N] (with an array ``data``) are passed per batch as ``y=`` (class-conditional models).
    Returns ``{"bpd", "bpd_stderr", "num_examples"}`` and, for the variational bound of
    :func:`make_bpd_fn`, ``"prior_bpd", "decoder_bpd", "vb_bpd": [T]`` (floats, bits/dim; ``vb_bpd``
    the per-timestep means, 0-based t, summing with ``prior_bpd`` to ``bpd``). ``bpd_fn`` may be
    any function returning ``{"total_bpd": [B]}`` (e.g. :func:`make_ode_bpd_fn`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    is_array = isinstance(data, (np.ndarray, jax.Array))
    if is_array:
        array = np.asarray(data)
        batches = (array[i : i + batch_size] for i in range(0, len(array), batch_size))
    elif labels is not None:
        raise ValueError("labels need data given as one array.")
    else:
        batches = iter(data)
    jitted = jax.jit(bpd_fn)
    totals, priors, vbs = [], [], []
    for i, batch in enumerate(batches):
        batch = np.asarray(batch, np.float32)
        if quantize:
            batch = quantize_8bit(batch)
        n = batch.shape[0]
        pad = (-n) % batch_size if is_array else 0
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        kwargs = {}
        if labels is not None:
            y = np.asarray(labels, np.int32)[i * batch_size : i * batch_size + n]
            kwargs["y"] = np.concatenate([y, np.repeat(y[-1:], pad)]) if pad else y
        out = jax.device_get(jitted(params, jax.random.fold_in(rng, i), batch, **kwargs))
        totals.append(np.asarray(out["total_bpd"][:n], np.float64))
        if "vb_bpd" in out:
            priors.append(np.asarray(out["prior_bpd"][:n], np.float64))
            vbs.append(np.asarray(out["vb_bpd"][:n], np.float64))
    if not totals:
        raise ValueError("evaluate_bpd got no data.")
    total = np.concatenate(totals)
    stderr = float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else float("nan")
    result = {"bpd": float(total.mean()), "bpd_stderr": stderr, "num_examples": int(len(total))}
    if vbs:
        prior, vb = np.concatenate(priors), np.concatenate(vbs)
        result.update(
            prior_bpd=float(prior.mean()), decoder_bpd=float(vb[:, 0].mean()), vb_bpd=vb.mean(0)
        )
    return result


# ------------------------------------------------------------------ probability-flow ODE likelihood
PROBES = ("rademacher", "gaussian")
# RK4's stages: stage s evaluates at t + c_s h from x + c_s h k_{s-1}; the step adds h sum_s b_s k_s.
_RK4_C = np.array([0.0, 0.5, 0.5, 1.0])
_RK4_B = np.array([1.0, 2.0, 2.0, 1.0]) / 6.0


def default_t_min(process: Process) -> float:
    """Where :func:`ode_log_likelihood` starts by default: t = 0 for flow (the data itself) and EDM
    (sigma_min), 1e-3 for VP (sigma'(t) is infinite at t = 0, where sigma = 0)."""
    return 1e-3 if process.kind == "vp" else 0.0


def _check_ode_options(
    process: Process, prediction: str, num_steps: Any, num_probes: Any, probe: str, t_min: float
) -> None:
    forward.check_objective(prediction)
    if process.is_discrete:
        raise ValueError(
            "the probability-flow ODE needs a continuous process; the discrete VP process's "
            "likelihood is its variational bound (make_bpd_fn). For a network that takes real-valued "
            "times, use process.replace(discrete=False)."
        )
    for name, value in (("num_steps", num_steps), ("num_probes", num_probes)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {PROBES}.")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min}.")
    if process.kind == "vp" and t_min <= 0.0:
        raise ValueError("a VP process needs t_min > 0: sigma'(t) is infinite at t = 0.")
    if process.kind == "flow" and prediction in ("eps", "edm"):
        raise ValueError(
            f"a {prediction!r}-predicting network cannot give x_0 where alpha = 0 (the flow "
            "process's t = 1, where the ODE ends); use prediction 'flow', 'v' or 'x0'."
        )
    if process.clean_at_zero and t_min == 0.0 and prediction in ("x0", "edm"):
        raise ValueError(
            f"a {prediction!r}-predicting network cannot give eps where sigma = 0 (t = 0); "
            "use t_min > 0, or prediction 'flow', 'v' or 'eps'."
        )


def _prior_std(process: Process) -> float:
    """prior_std(sigma(1)): 1 for VP and flow, sigma_max for EDM (flow and EDM hold no arrays, so
    their sigma(1) is a build-time float even when the process is a traced argument)."""
    if process.kind == "vp":
        return process.prior_std(1.0)
    return process.prior_std(float(process.alpha_sigma(np.float64(1.0), np)[1]))


def ode_log_likelihood(
    denoise_fn: Callable[..., jax.Array],
    process: Process,
    params: Any,
    x0: jax.Array,
    rng: jax.Array,
    *,
    prediction: str = "eps",
    num_steps: int = 100,
    num_probes: int = 1,
    probe: str = "rademacher",
    exact_trace: bool = False,
    t_min: float | None = None,
    **model_kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """log p(x0) in nats [B] under the model's probability-flow ODE, and x0's image x_T at t = 1.

    For x_t = alpha(t) x_0 + sigma(t) eps the marginals p_t are carried by the ODE (Song et al. 2021,
    eq. 13; the conditional flow of Lipman et al. 2022 averaged over x_0)

        dx/dt = f(x, t) = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat(x, t),

    with (x0_hat, eps_hat) the network's E[x_0 | x_t], E[eps | x_t] (:func:`forward.x0_eps_from_output`;
    the network is called as the samplers call it: x_t scaled by :func:`forward.network_input_scale`
    when the prediction or process is EDM, at the network time ``process.model_time(t)``). Along a
    solution d log p_t(x(t)) / dt = -div f (the instantaneous change of variables, Chen et al. 2018),
    so

        log p_{t_min}(x0) = log N(x_1; 0, prior_std^2 I) + int_{t_min}^{1} div f(x(t), t) dt,

    integrated from x(t_min) = x0 to t = 1 together with x by ``num_steps`` fixed RK4 steps in one
    ``lax.scan`` (compile time does not grow with ``num_steps``; the network is traced once). The
    steps are even in t for flow and EDM (alpha' and sigma' by ``jax.jvp`` of
    ``process.alpha_sigma``; EDM's t is its rho-spaced noise level) and, for VP, even in the log-SNR
    lambda from lambda(t_min) to lambda(1): the same ODE in another variable, where alpha^2 =
    sigmoid(lambda) and sigma^2 = sigmoid(-lambda) are smooth, while the process's alpha(t), sigma(t)
    (log alpha-bar linear between the T nodes) have derivatives that jump at every node, and RK4 over
    the jumps converges only erratically (about first order); the network is then given
    ``model_time(t_from_log_snr(lambda))``.

    The divergence is FFJORD's Hutchinson estimate (Grathwohl et al. 2019) z^T (df/dx) z averaged over
    ``num_probes`` probes z (``probe`` "rademacher" or "gaussian", E[z z^T] = I), drawn from ``rng``
    once per call and held fixed along the path (unbiased: so is each time's estimate); or, with
    ``exact_trace=True``, the exact trace from D forward-mode products against the basis vectors
    (D = prod(x0.shape[1:]); memory D times one evaluation's, so small D only; ``rng`` unused).
    The products are of one ``jax.linearize`` of f, so P probes cost one network evaluation plus P
    Jacobian-vector products per RK4 stage (4 stages a step). The Jacobian is per example only if
    the network treats the examples of a batch independently (no batch statistics).

    Approximations besides the network's and the solver's: the prior N(0, prior_std^2 I), prior_std =
    ``process.prior_std(sigma(1))``, stands for p_1, and the error in log p is log N(x_1; 0,
    prior_std^2 I) - log p_1(x_1). Flow: none (alpha(1) = 0, sigma(1) = 1). VP: p_1 is the data
    scaled by alpha(1) = sqrt(alpha-bar_T) (6e-3 for DDPM's linear schedule) plus N(0, sigma(1)^2 I);
    EDM: the data plus N(0, sigma_max^2 I). Point by point the error is of order alpha(1) |x_0|
    |x_1| (VP) or |x_0| |x_1| / sigma_max^2 ~ |x_0| / sigma_max (EDM) nats per dimension, about 1e-2
    for data in [-1, 1], with either sign; averaged over the data it is -KL(p_1 || prior), of order
    alpha(1)^2 E|x_0|^2 / 2 (VP) or E|x_0|^2 / (2 sigma_max^2) (EDM) per dimension, below 1e-4. And
    p_{t_min} is the data's density only for flow (t_min = 0); EDM's is the data plus N(0,
    sigma_min^2 I), VP's the data scaled by alpha(t_min) plus N(0, sigma(t_min)^2 I).

    ``t_min`` None: :func:`default_t_min`. ``prediction`` as for the samplers ('eps', 'x0', 'v',
    'flow', 'edm'); combinations undefined at an end of [t_min, 1] (eps or edm on flow, which ends at
    alpha = 0; x0 or edm where sigma(t_min) = 0) are refused. ``model_kwargs`` reach ``denoise_fn``.
    Pure and jittable with ``params``, ``x0``, ``rng``, ``process`` and the model kwargs as arguments
    and the options static. Returns ``(log_p [B], x_T [B, ...])``, both float32.
    """
    process = as_process(process)
    t_min = default_t_min(process) if t_min is None else float(t_min)
    _check_ode_options(process, prediction, num_steps, num_probes, probe, t_min)
    x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batch [B, ...] with at least 2 axes, got {x0.shape}.")
    batch, event_shape = x0.shape[0], x0.shape[1:]
    dim = math.prod(event_shape)
    scale_input = prediction == "edm" or process.kind == "edm"

    if exact_trace:
        basis = jnp.eye(dim, dtype=jnp.float32).reshape((dim, 1) + event_shape)
        probes = jnp.broadcast_to(basis, (dim,) + x0.shape)
    elif probe == "rademacher":
        probes = jax.random.rademacher(rng, (num_probes,) + x0.shape, jnp.float32)
    else:
        probes = jax.random.normal(rng, (num_probes,) + x0.shape, jnp.float32)
    sum_axes = tuple(range(2, probes.ndim))

    # The integration variable u: t for flow and EDM (alpha, sigma smooth in t), lambda for VP.
    # VP's alpha(t), sigma(t) interpolate log alpha-bar linearly between the T nodes, so their
    # derivatives jump at every node, and a fixed-step RK4 across the jumps converges erratically,
    # about first order. In lambda the same marginals have the smooth alpha^2 = sigmoid(lambda),
    # sigma^2 = sigmoid(-lambda), and the network is given model_time(t(lambda)).
    frac = np.linspace(0.0, 1.0, num_steps + 1)
    stage_frac = frac[:-1, None] + _RK4_C[None, :] * np.diff(frac)[:, None]
    if process.kind == "vp":
        lam_min = process.log_snr(jnp.float32(t_min))
        lam_max = process.log_snr(jnp.float32(1.0))  # jnp: the process may be traced
        stage_u = lam_min + (lam_max - lam_min) * jnp.asarray(stage_frac, jnp.float32)
        step_h = (lam_max - lam_min) * jnp.asarray(np.diff(frac), jnp.float32)

        def coefficients(lam):
            return jnp.exp(0.5 * jax.nn.log_sigmoid(lam)), jnp.exp(0.5 * jax.nn.log_sigmoid(-lam))

        def network_time(lam):
            return process.model_time(process.t_from_log_snr(lam))
    else:  # float64 stage times, so that the last stage is t = 1 exactly
        stage_u = jnp.asarray(t_min + (1.0 - t_min) * stage_frac, jnp.float32)
        step_h = jnp.asarray((1.0 - t_min) * np.diff(frac), jnp.float32)
        coefficients, network_time = process.alpha_sigma, process.model_time

    def velocity_and_divergence(x, u):
        """(f(x, u) [B, ...], div f [B]) at the scalar ``u`` (t, or lambda for VP)."""
        (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(coefficients, (u,), (jnp.ones_like(u),))
        model_t = jnp.full((batch,), network_time(u), jnp.float32)
        scale = None
        if scale_input:
            scale = forward.network_input_scale(
                alpha, sigma, prediction, process.kind, process.sigma_data
            )

        def velocity(x):
            output = denoise_fn(params, x if scale is None else x * scale, model_t, **model_kwargs)
            if output.shape != x.shape:
                raise ValueError(
                    f"model output shape {output.shape} must equal the data shape {x.shape}."
                )
            x0_hat, eps_hat = forward.x0_eps_from_output(
                output.astype(jnp.float32), x, alpha, sigma, prediction, process.sigma_data
            )
            return d_alpha * x0_hat + d_sigma * eps_hat

        f, f_jvp = jax.linearize(velocity, x)
        quad = jnp.sum(probes * jax.vmap(f_jvp)(probes), axis=sum_axes)  # z^T J z, [P, B]
        div = jnp.sum(quad, axis=0) if exact_trace else jnp.mean(quad, axis=0)
        return f, div

    stage_c, stage_b = jnp.asarray(_RK4_C, jnp.float32), jnp.asarray(_RK4_B, jnp.float32)

    def rk4_step(carry, step_in):
        x, delta = carry
        us, dt = step_in

        def stage(stage_carry, stage_in):
            k_x, _, acc_x, acc_d = stage_carry
            u, c, b = stage_in
            k_x, k_d = velocity_and_divergence(x + (c * dt) * k_x, u)
            return (k_x, k_d, acc_x + b * k_x, acc_d + b * k_d), None

        zeros_b = jnp.zeros((batch,), jnp.float32)
        init = (jnp.zeros_like(x), zeros_b, jnp.zeros_like(x), zeros_b)
        (_, _, acc_x, acc_d), _ = jax.lax.scan(stage, init, (us, stage_c, stage_b))
        return (x + dt * acc_x, delta + dt * acc_d), None

    carry = (x0, jnp.zeros((batch,), jnp.float32))
    (x_T, delta), _ = jax.lax.scan(rk4_step, carry, (stage_u, step_h))
    std = _prior_std(process)
    sq = jnp.sum(jnp.square(x_T).reshape(batch, -1), axis=1)
    prior_log_p = -0.5 * dim * math.log(2.0 * math.pi * std**2) - 0.5 * sq / std**2
    return prior_log_p + delta, x_T


def dequantize_8bit(x: jax.Array, rng: jax.Array) -> jax.Array:
    """Uniform dequantization of 8-bit data in [-1, 1] (Theis et al. 2016; score_sde's evaluation).

    The level k = round((x + 1) 127.5) (x on the grid -1 + 2k/255 of :func:`quantize_8bit`, or
    rounded to it) becomes -1 + 2 (k + u) / 256, u ~ U[0, 1) per element: a uniform draw from k's
    bin [-1 + 2k/256, -1 + 2(k + 1)/256), the 256 bins of width 2/256 tiling [-1, 1).
    """
    x = jnp.asarray(x, jnp.float32)
    k = jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0)
    u = jax.random.uniform(rng, x.shape, jnp.float32)
    return -1.0 + 2.0 * (k + u) / 256.0


def ode_bits_per_dim(
    denoise_fn: Callable[..., jax.Array],
    process: Process,
    params: Any,
    x0: jax.Array,
    rng: jax.Array,
    *,
    dequantize: bool = False,
    **kwargs: Any,
) -> jax.Array:
    """Bits/dim [B] of 8-bit data in [-1, 1] from :func:`ode_log_likelihood` (``kwargs`` go there).

    The model's probability of the 8-bit image k is its density's mass over k's bin B_k, a cube of
    side 2/256 in [-1, 1]^D (see :func:`dequantize_8bit`). With the dequantized x = -1 + 2 (k + u)/256,
    u ~ U[0, 1)^D, Jensen's inequality gives (Theis et al. 2016; Ho et al. 2019)

        log2 P(k) = log2 E_u[p(x) |B_k|] >= E_u[log2 p(x)] + D log2(2/256),

    so per dimension

        bpd = -log p(x) / (D ln 2) + log2(256 / 2) = -log p(x) / (D ln 2) + 7

    is, averaged over u, an upper bound on the discrete model's -log2 P(k) / D: score_sde's
    ``offset = 7 - inverse_scaler(-1)`` for centred data. ``dequantize=True`` draws u from the first
    half of ``rng`` (the ODE's probes from the second); ``dequantize=False`` evaluates the density at
    ``x0`` as given with ``rng`` passed on unchanged: comparable to other models only as a density
    on the grid, not a bound on the discrete likelihood.
    """
    x0 = jnp.asarray(x0, jnp.float32)
    if dequantize:
        deq_rng, rng = jax.random.split(rng)
        x0 = dequantize_8bit(x0, deq_rng)
    log_p, _ = ode_log_likelihood(denoise_fn, process, params, x0, rng, **kwargs)
    dim = math.prod(x0.shape[1:])
    return -log_p / (dim * math.log(2.0)) + math.log2(256.0 / 2.0)


def make_ode_bpd_fn(
    denoise_fn: Callable[..., jax.Array],
    process: Process,
    *,
    prediction: str = "eps",
    num_steps: int = 100,
    num_probes: int = 1,
    dequantize: bool = True,
) -> BpdFn:
    """``bpd(params, rng, x0, **model_kwargs) -> {"total_bpd": [B]}`` by :func:`ode_bits_per_dim`
    (uniformly dequantized 8-bit data by default: an upper bound on the discrete model's bits/dim),
    pure and jittable, for :func:`evaluate_bpd` on a continuous process."""
    _check_ode_options(
        process, prediction, num_steps, num_probes, "rademacher", default_t_min(process)
    )

    def bpd(
        params: Any, rng: jax.Array, x0: jax.Array, **model_kwargs: Any
    ) -> dict[str, jax.Array]:
        total = ode_bits_per_dim(
            denoise_fn, process, params, x0, rng, dequantize=dequantize, prediction=prediction,
            num_steps=num_steps, num_probes=num_probes, **model_kwargs,
        )  # fmt: skip
        return {"total_bpd": total}

    return bpd
