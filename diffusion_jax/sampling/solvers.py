"""One function per sampler, each one step x_i -> x_{i-1} between two noise levels of any process.

Every solver has the signature ``step(ctx, params, x, i, key, aux, model_kwargs) -> (x_next, x0_hat,
aux)``: ``ctx`` is the chain's :class:`StepContext` (the levels as float32 arrays and ``predict``),
``i`` the traced step index (the chain runs i = S - 1 down to 0), ``key`` this step's PRNG key and
``aux`` the solver's history (DPM-Solver's previous x0_hat). Each is written in terms of (alpha, sigma)
at the current and next level; the ODE solvers work on y = x / alpha at noise-to-signal ratio
s = sigma / alpha, where the probability-flow ODE is dy/ds = eps_hat (Karras et al. 2022 sec. 2).

:data:`SOLVERS` is the only list of sampler names: adding a sampler is one function and one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.reverse import learned_log_variance


class Prediction(NamedTuple):
    """The network's raw ``output`` and the (x_0, eps) it implies at the level it was asked about."""

    output: jax.Array
    x0: jax.Array
    eps: jax.Array
    model_t: jax.Array  # [B]: the time the network was given


class StepContext(NamedTuple):
    """What a solver step may use: the levels (``diffusion_jax.processes.Levels`` fields as float32
    arrays, plus ``large_var``) and ``predict(params, x, level, model_kwargs, guide=True)`` where
    ``level`` is (alpha, sigma, model_t) or a step index; options of the sampler."""

    levels: Any
    predict: Callable[..., Prediction]
    eta: float
    variance: str
    s_noise: float
    churn: bool
    flow_frame: bool  # heun integrates in x and t (the flow process) rather than y and s
    cond_fn: Callable[..., jax.Array] | None
    self_condition: bool = False  # model_kwargs carry x_self_cond, the latest x_0 estimate


def _noise(key: jax.Array, x: jax.Array) -> jax.Array:
    return jax.random.normal(key, x.shape, jnp.float32)


def ddpm(ctx: StepContext, params, x, i, key, aux, model_kwargs):
    """Ancestral sampling from p(x_{i-1} | x_i) = q(x_{i-1} | x_i, x0_hat) (Ho et al. Algorithm 2),
    variance fixed_small (the posterior's), fixed_large (q(x_i | x_{i-1})'s, beta_i for VP) or
    learned_range (Nichol & Dhariwal eq. 15); classifier guidance shifts the mean by Sigma grad
    (Dhariwal & Nichol Algorithm 1)."""
    lv = ctx.levels
    pred = ctx.predict(params, x, i, model_kwargs, guide=False)
    mean = lv.post_coef_x0[i] * pred.x0 + lv.post_coef_xt[i] * x
    if ctx.variance == "learned_range":
        var_output = jnp.split(pred.output, 2, axis=-1)[1].astype(x.dtype)
        log_var = learned_log_variance(var_output, lv.post_log_var[i], jnp.log(lv.step_var[i]))
        var = jnp.exp(log_var)
    elif ctx.variance == "fixed_small":
        var, log_var = lv.post_var[i], lv.post_log_var[i]
    else:
        var = lv.large_var[i]
        log_var = jnp.log(var)
    if ctx.cond_fn is not None:
        mean = mean + var * ctx.cond_fn(params, x, pred.model_t, **model_kwargs)
    noise = _noise(key, x)
    return mean + (i > 0).astype(x.dtype) * jnp.exp(0.5 * log_var) * noise, pred.x0, aux


def ddim(ctx: StepContext, params, x, i, key, aux, model_kwargs):
    """DDIM (Song et al. 2021 eq. 12): x_{i-1} = alpha' x0_hat + sqrt(sigma'^2 - s^2) eps_hat + s z with
    s = eta sqrt(posterior variance); eta = 0 is deterministic, eta = 1 ancestral."""
    lv = ctx.levels
    pred = ctx.predict(params, x, i, model_kwargs)
    sig = ctx.eta * jnp.sqrt(lv.post_var[i])
    direction = jnp.sqrt(jnp.maximum(lv.sigma_next[i] ** 2 - sig**2, 0.0))
    x_next = lv.alpha_next[i] * pred.x0 + direction * pred.eps + sig * _noise(key, x)
    return x_next, pred.x0, aux


def euler(ctx: StepContext, params, x, i, key, aux, model_kwargs):
    """Euler on the probability-flow ODE dy/ds = eps_hat (Karras et al. Algorithm 1): y' = y + (s' - s)
    eps_hat, written as x' = alpha' x0_hat + sigma' eps_hat (the same number, and DDIM with eta = 0),
    which stays finite where alpha = 0 (flow's t = 1; there it is Euler in t on dx/dt = eps - x_0)."""
    lv = ctx.levels
    pred = ctx.predict(params, x, i, model_kwargs)
    return lv.alpha_next[i] * pred.x0 + lv.sigma_next[i] * pred.eps, pred.x0, aux


def heun(ctx: StepContext, params, x, i, key, aux, model_kwargs):
    """Karras et al. Algorithm 2: churn (raise s = sigma / alpha to s_hat = s (1 + gamma_i), adding
    noise of std sqrt(s_hat^2 - s^2) S_noise in y = x / alpha), an Euler step to the next level, and
    the trapezoidal correction unless the next level is clean. In y and s (EDM's own variables on
    the edm process); on the flow process in x and t (dx/dt = eps_hat - x0_hat, as rectified-flow
    code does), where s is infinite at t = 1."""
    lv = ctx.levels
    alpha, sigma, alpha_next, sigma_next = (
        lv.alpha[i],
        lv.sigma[i],
        lv.alpha_next[i],
        lv.sigma_next[i],
    )
    level, a_hat, s_hat = i, alpha, sigma
    if ctx.churn:
        a_hat, s_hat = lv.alpha_hat[i], lv.sigma_hat[i]
        raise_by = jnp.sqrt(jnp.maximum((s_hat / a_hat) ** 2 - (sigma / alpha) ** 2, 0.0))
        churned = (a_hat / alpha) * x + a_hat * raise_by * ctx.s_noise * _noise(key, x)
        x = jnp.where(lv.gamma[i] > 0, churned, x)  # alpha = 0 levels never churn
        level = (a_hat, s_hat, lv.model_t_hat[i])
    pred = ctx.predict(params, x, level, model_kwargs)
    if ctx.self_condition:  # the second evaluation is conditioned on the first one's x0_hat
        model_kwargs = {**model_kwargs, "x_self_cond": pred.x0}
    if ctx.flow_frame:  # x and t: on the flow process t = sigma
        dt = sigma_next - s_hat
        x_euler = x + dt * (pred.eps - pred.x0)

        def trapezoid(_):
            second = ctx.predict(params, x_euler, i - 1, model_kwargs)
            return x + dt * 0.5 * ((pred.eps - pred.x0) + (second.eps - second.x0))

        x_next = jax.lax.cond(i > 0, trapezoid, lambda _: x_euler, None)
        return x_next, pred.x0, aux
    y = x / a_hat
    h = sigma_next / alpha_next - s_hat / a_hat
    y_euler = y + h * pred.eps

    def trapezoid_y(_):
        eps_next = ctx.predict(params, alpha_next * y_euler, i - 1, model_kwargs).eps
        return y + h * 0.5 * (pred.eps + eps_next)

    y_next = jax.lax.cond(i > 0, trapezoid_y, lambda _: y_euler, None)
    return alpha_next * y_next, pred.x0, aux


def dpm_solver_2m(ctx: StepContext, params, x, i, key, aux, model_kwargs):
    """DPM-Solver++(2M) (Lu et al. 2022 Algorithm 2) in lambda = log(alpha / sigma); first order at the
    first step and at the last (which lands on sigma = 0)."""
    lv = ctx.levels
    pred = ctx.predict(params, x, i, model_kwargs)
    alpha, sigma, alpha_next, sigma_next = (
        lv.alpha[i],
        lv.sigma[i],
        lv.alpha_next[i],
        lv.sigma_next[i],
    )
    x0_prev, h_prev, has_prev = aux
    lam = jnp.log(alpha / sigma)
    lam_next = jnp.log(alpha_next / jnp.where(i > 0, sigma_next, 1.0))
    h = lam_next - lam
    r = h_prev / h
    second = jnp.logical_and(has_prev, i > 0)
    d = jnp.where(second, (1.0 + 0.5 / r) * pred.x0 - (0.5 / r) * x0_prev, pred.x0)
    exp_neg_h = (sigma_next * alpha) / (alpha_next * sigma)  # e^{-h}, exactly 0 at the last step
    x_next = (sigma_next / sigma) * x - alpha_next * (exp_neg_h - 1.0) * d
    return x_next, pred.x0, (pred.x0, h, jnp.ones((), bool))


def dpm_solver_3m(ctx: StepContext, params, x, i, key, aux, model_kwargs):
    """DPM-Solver++(3M) (Lu et al. 2022, multistep third order, as in k-diffusion's
    ``sample_dpmpp_3m_sde`` with eta = 0): lower order while the history fills and at the last step."""
    lv = ctx.levels
    pred = ctx.predict(params, x, i, model_kwargs)
    alpha, sigma, alpha_next, sigma_next = (
        lv.alpha[i],
        lv.sigma[i],
        lv.alpha_next[i],
        lv.sigma_next[i],
    )
    (x0_1, x0_2), (h_1, h_2), count = aux
    lam = jnp.log(alpha / sigma)
    lam_next = jnp.log(alpha_next / jnp.where(i > 0, sigma_next, 1.0))
    h = lam_next - lam
    phi_1 = -jnp.expm1(-h)  # 1 - e^{-h}
    phi_2 = 1.0 - phi_1 / h
    phi_3 = phi_2 / h - 0.5
    last = i == 0
    r0, r1 = h_1 / h, h_2 / h
    d1_0 = (pred.x0 - x0_1) / r0
    d1_1 = (x0_1 - x0_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    third = pred.x0 * phi_1 + phi_2 * d1 - phi_3 * d2
    second = pred.x0 * phi_1 + phi_2 * d1_0
    first = pred.x0 * phi_1
    use3 = jnp.logical_and(count >= 2, ~last)
    use2 = jnp.logical_and(count >= 1, ~last)
    update = jnp.where(use3, third, jnp.where(use2, second, first))
    # x_{i-1} = (sigma' / sigma) x + alpha' (phi_1 D + phi_2 D1 - phi_3 D2); at the last step x0_hat.
    x_next = (sigma_next / sigma) * x + alpha_next * jnp.where(last, pred.x0, update)
    return x_next, pred.x0, ((pred.x0, x0_1), (h, h_1), count + 1)


class Solver(NamedTuple):
    """A sampler: its step, whether it is a deterministic ODE solver (discrete VP defaults to Karras
    spacing for those), and whether it carries a history (then RePaint resampling cannot repeat it)."""

    step: Callable[..., Any]
    ode: bool
    history: bool


SOLVERS: dict[str, Solver] = {
    "ddpm": Solver(ddpm, ode=False, history=False),
    "ddim": Solver(ddim, ode=False, history=False),
    "euler": Solver(euler, ode=True, history=False),
    "heun": Solver(heun, ode=True, history=False),
    "dpm_solver_2m": Solver(dpm_solver_2m, ode=True, history=True),
    "dpm_solver_3m": Solver(dpm_solver_3m, ode=True, history=True),
}
SAMPLERS = tuple(SOLVERS)
ODE_SAMPLERS = tuple(name for name, s in SOLVERS.items() if s.ode)


def initial_history(name: str, shape: tuple[int, ...]) -> Any:
    """The ``aux`` a solver starts from (empty history)."""
    zeros = jnp.zeros(shape, jnp.float32)
    if name == "dpm_solver_2m":
        return (zeros, jnp.ones((), jnp.float32), jnp.zeros((), bool))
    if name == "dpm_solver_3m":
        ones = jnp.ones((), jnp.float32)
        return ((zeros, zeros), (ones, ones), jnp.zeros((), jnp.int32))
    return ()
