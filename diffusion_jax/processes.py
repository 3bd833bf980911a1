"""Noise processes x_t = alpha(t) x_0 + sigma(t) eps on t in [0, 1], and the noise levels samplers walk.

Every process has a log-SNR lambda(t) = 2 log(alpha(t) / sigma(t)), decreasing in t (t = 1 is the
noisiest level), and the maps between t, lambda and the time value the network is given:

- ``vp``: variance preserving, alpha^2 + sigma^2 = 1 (Ho et al. 2020; Song et al. 2021). Built from any
  beta schedule (:func:`diffusion_jax.schedules.make_schedule`): log alpha-bar is interpolated linearly
  in t between the T nodes t_k = (k + 1) / T, where it equals the schedule's alpha-bar_k exactly, and
  0 at t = 0. With ``discrete=True`` (the default, DDPM) training draws the T integer steps and
  samplers respace the T-step table, exactly as the :class:`Schedule` code always has; the network is
  given the 0-based step index t T - 1.
- ``flow``: rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022), alpha = 1 - t,
  sigma = t; the network is given 1000 t.
- ``edm``: variance exploding with Karras et al. (2022)'s rho-spaced noise levels, alpha = 1 and
  sigma(t) = (sigma_max^(1/rho) t + sigma_min^(1/rho) (1 - t))^rho, so that evenly spaced t are EDM's
  discretisation (eq. 5); the network is given 1000 c_noise = 250 ln sigma (EDM Table 1).

Process coefficients are computed in float64 numpy where a sampler's grid is built (once, at build
time) and in float32 inside jitted training steps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.schedules import (
    SPACINGS,
    Schedule,
    karras_timesteps,
    log_alphas_cumprod,
    space_timesteps,
)

PROCESSES = ("vp", "flow", "edm")
TIME_SAMPLINGS = ("uniform", "logit_normal", "log_normal")


@flax.struct.dataclass
class Process:
    """A noise process (see the module docstring); build it with :func:`make_process` or :func:`vp`.

    ``schedule`` (VP only) is the T-step DDPM table and ``log_alpha_bar`` (float32 [T + 1]) log
    alpha-bar at t = k / T. ``sigma_min``/``sigma_max``/``rho`` define EDM's levels (and the Karras
    spacing of the other processes); ``sigma_data`` is the data's standard deviation in EDM's
    preconditioning. The arrays are pytree leaves, so a process is an ordinary ``jit`` argument.
    """

    schedule: Schedule | None
    log_alpha_bar: jax.Array | None
    kind: str = flax.struct.field(pytree_node=False, default="vp")
    discrete: bool = flax.struct.field(pytree_node=False, default=True)
    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
    rho: float = flax.struct.field(pytree_node=False, default=7.0)
    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)

    @property
    def num_timesteps(self) -> int | None:
        """T of a VP process (None otherwise)."""
        return None if self.schedule is None else self.schedule.num_timesteps

    @property
    def is_discrete(self) -> bool:
        """True for the T-step DDPM process (integer steps, exact table maths)."""
        return self.kind == "vp" and self.discrete

    @property
    def clean_at_zero(self) -> bool:
        """True when sigma(0) = 0 (VP, flow); EDM's t = 0 is sigma_min, one step from clean."""
        return self.kind != "edm"

    # ----- t -> (alpha, sigma), lambda, network time; lambda -> t. xp is numpy or jax.numpy. -----
    def _vp_nodes(self, xp):
        T = self.num_timesteps
        grid = xp.arange(T + 1, dtype=xp.float64 if xp is np else xp.float32) / T
        table = self.log_alpha_bar if xp is not np else np.asarray(self.log_alpha_bar, np.float64)
        return grid, table

    def _edm_sigma(self, t, xp):
        inv = 1.0 / self.rho
        base = self.sigma_max**inv * t + self.sigma_min**inv * (1.0 - t)
        return xp.maximum(base, 0.0) ** self.rho

    def alpha_sigma(self, t: Any, xp: Any = jnp) -> tuple[Any, Any]:
        """(alpha(t), sigma(t)), elementwise over ``t`` (any shape)."""
        if self.kind == "vp":
            grid, table = self._vp_nodes(xp)
            la = xp.interp(t, grid, table)
            return xp.exp(0.5 * la), xp.sqrt(-xp.expm1(la))
        if self.kind == "flow":
            return 1.0 - t + 0.0 * t, t + 0.0 * t
        return xp.ones_like(t), self._edm_sigma(t, xp)

    def log_snr(self, t: Any, xp: Any = jnp) -> Any:
        """lambda(t) = 2 log(alpha / sigma) (+inf where sigma = 0, -inf where alpha = 0)."""
        alpha, sigma = self.alpha_sigma(t, xp)
        return 2.0 * (xp.log(alpha) - xp.log(sigma))

    def t_from_log_snr(self, lam: Any, xp: Any = jnp) -> Any:
        """The t with lambda(t) = ``lam`` (VP: clamped to [0, 1]; EDM: may leave [0, 1])."""
        if self.kind == "vp":
            grid, table = self._vp_nodes(xp)
            la = -xp.logaddexp(0.0, -lam)  # log sigmoid(lambda) = log alpha-bar
            return xp.interp(-la, -table, grid)
        noise_to_signal = xp.exp(-0.5 * lam)  # sigma / alpha
        if self.kind == "flow":
            return noise_to_signal / (1.0 + noise_to_signal)
        inv = 1.0 / self.rho
        return (noise_to_signal**inv - self.sigma_min**inv) / (
            self.sigma_max**inv - self.sigma_min**inv
        )

    def model_time(self, t: Any, xp: Any = jnp) -> Any:
        """The time value the network is given at ``t`` (see the module docstring)."""
        if self.kind == "vp":
            return t * self.num_timesteps - 1.0
        if self.kind == "flow":
            return 1000.0 * t
        return 250.0 * xp.log(self._edm_sigma(t, xp))

    def t_from_model_time(self, model_t: Any, xp: Any = jnp) -> Any:
        """Inverse of :meth:`model_time` (for analytic denoisers in tests and notebooks)."""
        model_t = xp.asarray(model_t, xp.float64 if xp is np else xp.float32)
        if self.kind == "vp":
            return (model_t + 1.0) / self.num_timesteps
        if self.kind == "flow":
            return model_t / 1000.0
        return self.t_from_log_snr(-2.0 * (model_t / 250.0), xp)

    def prior_std(self, sigma_first: float) -> float:
        """Standard deviation of the Gaussian the samplers start from at noise level ``sigma_first``."""
        return 1.0 if self.kind == "vp" else float(sigma_first)


def vp(schedule: Schedule, *, discrete: bool = True, sigma_data: float = 0.5) -> Process:
    """The VP process of a beta :class:`Schedule` (see the module docstring)."""
    # jnp, not numpy: the schedule may be a traced jit argument.
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    log_abar = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.log(abar)])
    return Process(
        schedule=schedule,
        log_alpha_bar=log_abar,
        kind="vp",
        discrete=discrete,
        sigma_data=sigma_data,
    )


def make_process(
    kind: str = "vp",
    *,
    schedule: Schedule | None = None,
    discrete: bool = True,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma_data: float = 0.5,
) -> Process:
    """A :class:`Process` of ``kind`` ("vp" needs ``schedule``), with its options checked."""
    if kind not in PROCESSES:
        raise ValueError(f"unknown process {kind!r}; choose one of {PROCESSES}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}.")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
    if kind == "vp":
        if schedule is None:
            raise ValueError(
                "a 'vp' process needs the beta schedule: make_process('vp', schedule=...)."
            )
        return vp(schedule, discrete=discrete, sigma_data=sigma_data)
    return Process(
        schedule=None,
        log_alpha_bar=None,
        kind=kind,
        discrete=False,
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        rho=float(rho),
        sigma_data=float(sigma_data),
    )


def as_process(process: Process | Schedule) -> Process:
    """A :class:`Process`; a bare :class:`Schedule` is the discrete VP process it has always been."""
    return vp(process) if isinstance(process, Schedule) else process


# ----------------------------------------------------------------------------- training times
def sample_training_times(
    process: Process,
    rng: jax.Array,
    batch: int,
    sampling: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> jax.Array:
    """Training times t [B] (float32) for a continuous process, drawn by ``sampling``:

    - ``uniform``: t ~ U(0, 1];
    - ``logit_normal``: t = sigmoid(loc + scale n), n ~ N(0, 1) (Esser et al. 2024, SD3);
    - ``log_normal``: ln(sigma / alpha) ~ N(loc, scale^2), EDM's (P_mean, P_std) = (-1.2, 1.2).
    """
    if sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time sampling {sampling!r}; choose one of {TIME_SAMPLINGS}.")
    if sampling == "uniform":
        return 1.0 - jax.random.uniform(rng, (batch,), jnp.float32)
    n = jax.random.normal(rng, (batch,), jnp.float32)
    if sampling == "logit_normal":
        return jax.nn.sigmoid(loc + scale * n)
    return process.t_from_log_snr(-2.0 * (loc + scale * n))


# ------------------------------------------------------------------------ sampling noise levels
class Levels(NamedTuple):
    """The noise levels a sampler walks, float64 numpy [S] indexed by step i (i = S - 1 is the first,
    noisiest; step i goes from level i to level i - 1, and step 0 to the clean level alpha = 1,
    sigma = 0). ``model_t`` is what the network is given (int for the discrete VP process).

    ``post_*`` describe q(x_{i-1} | x_i, x_0) (Kingma et al. 2021 eq. 33; Ho et al. eqs. 6-7 for VP):
    mean = post_coef_x0 x_0 + post_coef_xt x_i, variance post_var (its log clipped at step 0 to that
    of step 1, improved-DDPM). ``step_alpha``, ``step_var`` describe q(x_i | x_{i-1}) =
    N(step_alpha x_{i-1}, step_var) (beta_i for VP). ``*_hat`` is each level raised by EDM's churn
    (equal to the level when ``gamma`` = 0).
    """

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    alpha_next: np.ndarray
    sigma_next: np.ndarray
    model_t: np.ndarray
    post_coef_x0: np.ndarray
    post_coef_xt: np.ndarray
    post_var: np.ndarray
    post_log_var: np.ndarray
    step_alpha: np.ndarray
    step_var: np.ndarray
    gamma: np.ndarray
    alpha_hat: np.ndarray
    sigma_hat: np.ndarray
    model_t_hat: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


def _karras_noise_to_signal(lo: float, hi: float, num_steps: int, rho: float) -> np.ndarray:
    """Karras et al. eq. 5: ``num_steps`` levels from ``hi`` down to ``lo`` (decreasing)."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    inv = 1.0 / rho
    return (hi**inv + ramp * (lo**inv - hi**inv)) ** rho


def _continuous_times(process: Process, num_steps: int, spacing: str, rho: float) -> np.ndarray:
    """Noisy levels t, decreasing, for a continuous process (float64 [num_steps])."""
    if spacing == "leading":
        raise ValueError(
            "'leading' spacing skips the noisiest step of a discrete T-step schedule and is defined "
            "for the discrete VP process only; use 'uniform' or 'trailing'."
        )
    if spacing == "karras":
        if process.kind == "edm":
            hi, lo = process.sigma_max, process.sigma_min
        elif process.kind == "vp":
            T = process.num_timesteps
            lo, hi = np.exp(-0.5 * process.log_snr(np.array([1.0 / T, 1.0]), np))
        else:  # flow: sigma / alpha is infinite at t = 1; use EDM's range
            lo, hi = process.sigma_min, process.sigma_max
        ratios = _karras_noise_to_signal(lo, hi, num_steps, rho)
        return process.t_from_log_snr(-2.0 * np.log(ratios), np)
    # uniform / trailing: evenly spaced from t = 1; EDM's includes t = 0 (sigma_min), the others stop
    # one step above the clean t = 0.
    top = np.linspace(1.0, 0.0, num_steps if not process.clean_at_zero else num_steps + 1)
    top = top[:num_steps]
    return top**2 if spacing == "quadratic" else top


def sampling_levels(
    process: Process | Schedule,
    num_steps: int | None = None,
    spacing: str | None = None,
    *,
    rho: float | None = None,
    churn: tuple[float, float, float] = (0.0, 0.0, float("inf")),
) -> Levels:
    """The :class:`Levels` of ``num_steps`` sampler steps with ``spacing`` on ``process``.

    ``spacing``: "uniform" | "leading" | "trailing" | "quadratic" (see :func:`space_timesteps`) or
    "karras" (noise-to-signal ratios sigma / alpha by Karras et al. eq. 5 with ``rho``, default the
    process's). None: "uniform" ("karras" is what "uniform" gives on EDM). ``num_steps`` None: all T
    steps (discrete VP), 18 otherwise (EDM's CIFAR-10 setting). ``churn`` = (S_churn, S_tmin, S_tmax):
    EDM's gamma_i = min(S_churn / S, sqrt 2 - 1) on levels with S_tmin <= sigma / alpha <= S_tmax.
    """
    process = as_process(process)
    spacing = "uniform" if spacing is None else spacing
    if spacing not in SPACINGS + ("karras",):
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS + ('karras',)}.")
    rho = process.rho if rho is None else rho
    if process.is_discrete:
        # improved-DDPM respacing: the kept steps keep their alpha-bar.
        sched = process.schedule
        T = sched.num_timesteps
        if spacing == "karras":
            kept = karras_timesteps(sched, T if num_steps is None else num_steps, rho)
        elif num_steps is None or num_steps == T:
            if spacing not in SPACINGS:
                raise ValueError(
                    f"unknown spacing {spacing!r}; choose one of {SPACINGS + ('karras',)}."
                )
            kept = np.arange(T)
        else:
            kept = space_timesteps(T, num_steps, spacing)
        # log alpha-bar summed in float64 from the stored betas, so 1 - alpha-bar keeps its digits
        # where it is tiny (the first steps), as the Schedule's own float64-built tables do.
        log_abar = log_alphas_cumprod(sched)[kept]
        alpha, sigma = np.exp(0.5 * log_abar), np.sqrt(-np.expm1(log_abar))
        model_t = np.asarray(sched.model_timesteps)[kept]
        t = (model_t + 1.0) / process.num_timesteps
    else:
        num_steps = 18 if num_steps is None else num_steps
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, (int, np.integer))
            or num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        t = _continuous_times(process, int(num_steps), spacing, rho)[::-1].copy()  # increasing in i
        if np.any(np.diff(t) <= 0):
            raise ValueError(f"{spacing!r} spacing of {num_steps} steps repeats a noise level.")
        alpha, sigma = process.alpha_sigma(t, np)
        model_t = process.model_time(t, np)
    alpha_next = np.concatenate([[1.0], alpha[:-1]])
    sigma_next = np.concatenate([[0.0], sigma[:-1]])
    # q(x_i | x_{i-1}) = N(step_alpha x_{i-1}, step_var) and the posterior q(x_{i-1} | x_i, x_0).
    step_alpha = alpha / alpha_next
    step_var = np.maximum(sigma**2 - (step_alpha * sigma_next) ** 2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        post_coef_xt = step_alpha * sigma_next**2 / sigma**2
        post_coef_x0 = alpha_next * step_var / sigma**2
        post_var = step_var * sigma_next**2 / sigma**2
    floor = post_var[1] if post_var.shape[0] > 1 else step_var[0]
    post_log_var = np.log(np.concatenate([[floor], post_var[1:]]))
    # EDM's churn (Karras et al. Algorithm 2, lines 4-6), raising sigma / alpha by (1 + gamma).
    s_churn, s_tmin, s_tmax = churn
    with np.errstate(divide="ignore"):
        ratio = sigma / alpha
    n = ratio.shape[0]
    in_range = (ratio >= s_tmin) & (ratio <= s_tmax) & (alpha > 0)  # no level above pure noise
    gamma = np.where(in_range, min(s_churn / n, math.sqrt(2.0) - 1.0), 0.0)
    if np.any(gamma > 0):
        if process.is_discrete:
            raise ValueError(
                "EDM churn raises the noise level off the T-step grid; the discrete VP process has "
                "no network time there. Use s_churn=0, or a continuous process (flow, edm, or vp "
                "with discrete=False)."
            )
        t_hat = process.t_from_log_snr(-2.0 * np.log(ratio * (1.0 + gamma)), np)
        alpha_hat, sigma_hat = process.alpha_sigma(t_hat, np)
        model_t_hat = process.model_time(t_hat, np)
    else:
        alpha_hat, sigma_hat, model_t_hat = alpha, sigma, model_t
    return Levels(
        t=t,
        alpha=alpha,
        sigma=sigma,
        alpha_next=alpha_next,
        sigma_next=sigma_next,
        model_t=model_t,
        post_coef_x0=post_coef_x0,
        post_coef_xt=post_coef_xt,
        post_var=post_var,
        post_log_var=post_log_var,
        step_alpha=step_alpha,
        step_var=step_var,
        gamma=gamma,
        alpha_hat=alpha_hat,
        sigma_hat=sigma_hat,
        model_t_hat=model_t_hat,
    )
