"""The sampling chain: one ``jax.lax.scan`` over a sampler's noise levels, compiled as one program.

The denoiser is any ``denoise_fn(params, x, t, **model_kwargs) -> output`` where ``output`` predicts
eps, x_0, v, the flow velocity eps - x_0 or EDM's F (and, for learned variance, carries the variance
interpolation as extra channels); ``t`` [B] is the process's network time (int 0-based steps for the
discrete VP process; see :mod:`diffusion_jax.processes`). The chain walks the levels from step S - 1
down to 0, drawing the step-i noise from ``fold_in(rng, i)``; its compile time does not grow with
the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import forward
from diffusion_jax.processes import Levels, Process, as_process, sampling_levels
from diffusion_jax.reverse import check_variance
from diffusion_jax.sampling import solvers
from diffusion_jax.schedules import Schedule

DenoiseFn = Callable[..., jax.Array]


class Chain(NamedTuple):
    """A sampler's reverse chain: its process and levels (float32 arrays), the scan, and one step."""

    process: Process
    levels: Any  # Levels of jnp arrays, plus large_var
    levels_np: Levels  # the same in float64 numpy (build-time values)
    run: Callable[..., Any]  # run(params, rng, x_start, first, post_step=None, context=None, **kw)
    step: Callable[..., Any]  # step(params, x, i, key, aux, model_kwargs) -> (x_next, x0_hat, aux)
    solver: solvers.Solver
    self_condition: bool = False

    def initial_estimate(self, shape: tuple[int, ...]) -> jax.Array | tuple[()]:
        """The x_0 estimate a self-conditioning chain carries into its first step: zeros [*shape]
        (Analog Bits Algorithm 2); ``()``, nothing carried, for a chain without self-conditioning."""
        return jnp.zeros(shape, jnp.float32) if self.self_condition else ()

    def conditioned(self, model_kwargs: dict[str, Any], x0_hat: Any) -> dict[str, Any]:
        """``model_kwargs`` for a step given the carried estimate ``x0_hat`` (see
        :meth:`initial_estimate`): with ``x_self_cond=x0_hat`` when the chain self-conditions."""
        return {**model_kwargs, "x_self_cond": x0_hat} if self.self_condition else model_kwargs

    def estimate(self, x0_hat: jax.Array) -> jax.Array | tuple[()]:
        """What the chain carries to the next step after a step's ``x0_hat`` (``()`` without
        self-conditioning)."""
        return x0_hat.astype(jnp.float32) if self.self_condition else ()

    @property
    def num_steps(self) -> int:
        return self.levels_np.num_steps

    @property
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian the chain starts from at its first (noisiest) level."""
        return self.process.prior_std(float(self.levels_np.sigma[-1]))

    def noised(self, images: jax.Array, i: Any, key: jax.Array) -> jax.Array:
        """q(x_i | x_0): ``images`` noised to level i."""
        noise = jax.random.normal(key, images.shape, jnp.float32)
        return self.levels.alpha[i] * images + self.levels.sigma[i] * noise

    def renoised(self, x_prev: jax.Array, i: Any, key: jax.Array) -> jax.Array:
        """q(x_i | x_{i-1}): one step back up from level i - 1 to level i."""
        noise = jax.random.normal(key, x_prev.shape, jnp.float32)
        return self.levels.step_alpha[i] * x_prev + jnp.sqrt(self.levels.step_var[i]) * noise


class _JnpLevels(NamedTuple):
    """:class:`Levels` as float32 arrays (``model_t`` int32 for the discrete VP process)."""

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    alpha_next: jax.Array
    sigma_next: jax.Array
    model_t: jax.Array
    post_coef_x0: jax.Array
    post_coef_xt: jax.Array
    post_var: jax.Array
    post_log_var: jax.Array
    step_alpha: jax.Array
    step_var: jax.Array
    gamma: jax.Array
    alpha_hat: jax.Array
    sigma_hat: jax.Array
    model_t_hat: jax.Array
    large_var: jax.Array  # fixed_large: q(x_i | x_{i-1})'s variance, the posterior's at step 0


def _to_jnp(levels: Levels, integer_time: bool) -> _JnpLevels:
    arrays = {k: np.asarray(v, np.float64) for k, v in levels._asdict().items()}
    floor = arrays["post_var"][1:2] if levels.num_steps > 1 else arrays["step_var"][:1]
    arrays["large_var"] = np.concatenate([floor, arrays["step_var"][1:]])
    out = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    if integer_time:
        for k in ("model_t", "model_t_hat"):
            out[k] = jnp.asarray(np.rint(arrays[k]), jnp.int32)
    return _JnpLevels(**out)


def trajectory_slots(num_steps: int, trajectory_steps: Sequence[int] | None) -> np.ndarray | None:
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


def make_chain(
    denoise_fn: DenoiseFn,
    process: Process | Schedule,
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
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    rho: float | None = None,
    self_condition: bool = False,
) -> Chain:
    """Validates the options and builds the scan over the sampler's levels (see ``make_sampler``)."""
    if sampler not in solvers.SOLVERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {solvers.SAMPLERS}.")
    solver = solvers.SOLVERS[sampler]
    process = as_process(process)
    forward.check_objective(prediction)
    check_variance(variance)
    if variance == "learned_range" and not process.is_discrete:
        raise ValueError(
            "learned_range variance is defined on the discrete VP process it was trained on "
            f"(Nichol & Dhariwal); this process is {process.kind!r}. Use fixed_small or fixed_large."
        )
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn} and {s_noise}.")
    if s_churn > 0 and sampler != "heun":
        raise ValueError(
            f"s_churn (EDM's stochastic churn) belongs to the heun sampler, not {sampler!r}."
        )
    if spacing is None and process.is_discrete:
        spacing = "karras" if solver.ode else "uniform"
    levels_np = sampling_levels(
        process, num_steps, spacing, rho=rho, churn=(s_churn, s_tmin, s_tmax)
    )
    if prediction in ("eps", "edm") and np.any(levels_np.alpha <= 0):
        raise ValueError(
            f"a {prediction!r}-predicting network cannot give x_0 where alpha = 0 (the flow process's "
            "t = 1): use prediction 'flow', 'v' or 'x0', or 'karras' spacing, which stops short of t = 1."
        )
    levels = _to_jnp(levels_np, integer_time=process.is_discrete)
    num_sampler_steps = levels_np.num_steps
    slots = trajectory_slots(num_sampler_steps, trajectory_steps)
    churn = bool(np.any(levels_np.gamma > 0))
    scale_input = prediction == "edm" or process.kind == "edm"

    def predict(params, x, level, model_kwargs, guide=True) -> solvers.Prediction:
        """The network at ``level`` (a step index, or (alpha, sigma, model_t)), with guidance."""
        if isinstance(level, tuple):
            alpha, sigma, model_t = level
        else:
            alpha, sigma, model_t = levels.alpha[level], levels.sigma[level], levels.model_t[level]
        shape, batch = x.shape, x.shape[0]
        model_t = jnp.full((batch,), model_t, levels.model_t.dtype)
        x_in = x
        if scale_input:
            x_in = x * forward.network_input_scale(
                alpha, sigma, prediction, process.kind, process.sigma_data
            )
        output = denoise_fn(params, x_in, model_t, **model_kwargs)
        mean_output = output
        doubled = shape[:-1] + (2 * shape[-1],)
        if variance == "learned_range" and output.shape != doubled:
            raise ValueError(
                f"learned_range variance needs a model output of shape {doubled} (prediction and "
                f"variance channels), got {output.shape}."
            )
        if output.shape == doubled:
            mean_output = jnp.split(output, 2, axis=-1)[0]
        elif output.shape != shape:
            raise ValueError(
                f"model output shape {output.shape} must equal the sample shape {shape} "
                f"(or have twice its channels, for learned variance)."
            )
        x0, eps = forward.x0_eps_from_output(
            mean_output.astype(x.dtype), x, alpha, sigma, prediction, process.sigma_data
        )
        if guide and cond_fn is not None:
            # Classifier guidance in score form (Dhariwal & Nichol Algorithm 2): eps - sigma grad.
            eps = eps - sigma * cond_fn(params, x, model_t, **model_kwargs)
            x0 = (x - sigma * eps) / alpha
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - alpha * x0) / sigma
        return solvers.Prediction(output, x0, eps, model_t)

    flow_frame = process.kind == "flow"
    ctx = solvers.StepContext(
        levels, predict, eta, variance, s_noise, churn, flow_frame, cond_fn, self_condition
    )

    def step(params, x, i, key, aux, model_kwargs):
        """One step x_i -> x_{i-1}: returns (x_{i-1}, x0_hat, aux)."""
        return solver.step(ctx, params, x, i, key, aux, model_kwargs)

    def run(params, rng, x_start, first: int, post_step=None, context=None, **model_kwargs):
        """Runs steps ``first, first - 1, ..., 0`` from ``x_start``; returns x_0 (and frames)."""
        shape = x_start.shape

        def body(carry, i):
            x, aux, frames, preds, x0_prev = carry
            key = jax.random.fold_in(rng, i)
            kwargs = chain.conditioned(model_kwargs, x0_prev)
            x_next, x0, aux = step(params, x, i, key, aux, kwargs)
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
            return (x_next.astype(jnp.float32), aux, frames, preds, chain.estimate(x0)), None

        aux = solvers.initial_history(sampler, shape)
        if slots is None:
            frames = preds = jnp.zeros((0,), jnp.float32)
        else:
            frames = preds = jnp.zeros((len(trajectory_steps),) + shape, jnp.float32)
        indices = jnp.arange(first, -1, -1, dtype=jnp.int32)
        carry = (x_start.astype(jnp.float32), aux, frames, preds, chain.initial_estimate(shape))
        (x0, _, frames, preds, _), _ = jax.lax.scan(body, carry, indices)
        return x0 if slots is None else (x0, frames, preds)

    chain = Chain(process, levels, levels_np, run, step, solver, self_condition)  # run's `chain`
    return chain


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, (batch, ...) with at least two axes."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (batch, ...) with at least 2 axes, got {shape}.")
    return shape


def make_sampler(
    denoise_fn: DenoiseFn,
    process: Process | Schedule,
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
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    rho: float | None = None,
    self_condition: bool = False,
) -> Callable[..., Any]:
    """Builds ``sample(params, rng, shape, **model_kwargs) -> x_0`` [*shape], a pure jittable function.

    ``process``: a :class:`~diffusion_jax.processes.Process`, or a :class:`Schedule` (the discrete VP
    process). ``sampler`` is a name in :data:`solvers.SAMPLERS`:
      - ``ddpm``: ancestral (Ho et al. Algorithm 2), ``variance`` fixed_small / fixed_large /
        learned_range (the network's extra channels, improved-DDPM; discrete VP only);
      - ``ddim``: Song et al. eq. 12 with ``eta`` (0 is deterministic, 1 is ancestral-like);
      - ``euler`` / ``heun``: the probability-flow ODE (Karras et al. Algorithms 1 and 2; ``heun``
        costs two evaluations per step but the last, and takes EDM's churn ``s_churn``, ``s_tmin``,
        ``s_tmax``, ``s_noise``);
      - ``dpm_solver_2m`` / ``dpm_solver_3m``: DPM-Solver++ (Lu et al. 2022), one evaluation a step.
    ``num_steps`` levels with ``spacing`` "uniform" | "leading" | "trailing" | "quadratic" | "karras"
    (see :func:`~diffusion_jax.processes.sampling_levels`; default: karras for the ODE samplers on
    the discrete VP process, uniform otherwise; ``rho`` for karras). ``clip_denoised`` clips x0_hat to
    [-1, 1] at each step (image data). ``cond_fn(params, x_t, t, **model_kwargs)`` returns a scaled
    gradient of log p(y | x_t) for classifier guidance (see :func:`classifier_guidance`).
    ``model_kwargs`` (labels ``y``, a ``guidance_scale``, ...) reach ``denoise_fn`` and ``cond_fn``.

    ``self_condition`` (Chen, Zhang & Hinton 2022, "Analog Bits", Algorithm 2): every evaluation
    also gets ``x_self_cond=``, the x0_hat of the step before (zeros at the first step; ``heun``'s
    second evaluation gets its first one's), as a model kwarg, so ``denoise_fn`` and ``cond_fn``
    must take it. Without it they are called exactly as before.

    With ``trajectory_steps`` (indices i of the sampler's steps, S-1 = first), ``sample`` returns
    ``(x_0, frames, x0_preds)``: ``frames[k]`` is x_i, the input of step ``trajectory_steps[k]``, and
    ``x0_preds[k]`` that step's predicted x_0; both [K, *shape].
    """
    chain = make_chain(
        denoise_fn, process, sampler=sampler, num_steps=num_steps, spacing=spacing,
        prediction=prediction, variance=variance, clip_denoised=clip_denoised, eta=eta,
        cond_fn=cond_fn, trajectory_steps=trajectory_steps, s_churn=s_churn, s_tmin=s_tmin,
        s_tmax=s_tmax, s_noise=s_noise, rho=rho, self_condition=self_condition,
    )  # fmt: skip
    last = chain.num_steps - 1
    prior_std = chain.prior_std

    def sample(params: Any, rng: jax.Array, shape: Sequence[int], **model_kwargs: Any):
        shape = check_shape(shape)
        init_rng, loop_rng = jax.random.split(rng)
        x_init = jax.random.normal(init_rng, shape, jnp.float32)
        if prior_std != 1.0:
            x_init = prior_std * x_init
        return chain.run(params, loop_rng, x_init, last, **model_kwargs)

    return sample
