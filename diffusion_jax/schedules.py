"""Noise schedules: beta_t -> every coefficient the forward process and samplers need.

Timesteps count from 0 everywhere in this library: index ``t = 0`` is the paper's ``t = 1`` (the
least-noisy latent) and ``t = T - 1`` is the paper's ``t = T``. Coefficient arrays have length ``T``
and are indexed by that ``t``.

Coefficients are computed in float64 numpy and stored as float32 ``jax.Array``s in a :class:`Schedule`
pytree, so a schedule can be passed through ``jax.jit`` as an ordinary argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_NAMES = ("linear", "cosine", "quadratic", "sigmoid", "geometric")


@flax.struct.dataclass
class Schedule:
    """The discrete-time diffusion q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    Every field is a float32 array of shape [T] indexed by the 0-based timestep ``t`` (see module
    docstring), except ``model_timesteps`` (int32 [T]): the timestep value fed to the network at each
    index. It is ``arange(T)`` for an ordinary schedule and the original timesteps for a respaced one,
    so respacing is invisible to samplers.
    """

    betas: jax.Array
    alphas: jax.Array  # 1 - beta_t
    alphas_cumprod: jax.Array  # alpha-bar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: jax.Array  # alpha-bar_{t-1}, with alpha-bar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(alpha-bar_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / alpha-bar_t - 1)
    posterior_variance: jax.Array  # beta-tilde_t = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t)
    posterior_log_variance_clipped: jax.Array  # log beta-tilde_t, with beta-tilde_0 := beta-tilde_1
    posterior_mean_coef1: jax.Array  # multiplies x_0 in mu-tilde_t (Ho et al. eq. 7)
    posterior_mean_coef2: jax.Array  # multiplies x_t in mu-tilde_t
    snr: jax.Array  # alpha-bar_t / (1 - alpha-bar_t)
    model_timesteps: jax.Array  # int32 [T]: the t passed to the network

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (a static Python int)."""
        return self.betas.shape[0]


def _check_betas(betas: np.ndarray) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1:
        raise ValueError(
            f"betas must be a 1-D array of length T, got shape {betas.shape}; pass one beta per step."
        )
    if betas.shape[0] < 1:
        raise ValueError("betas is empty: a schedule needs at least one step (T >= 1).")
    if not np.all(np.isfinite(betas)):
        raise ValueError(
            f"betas contains non-finite values at indices {np.flatnonzero(~np.isfinite(betas))[:5]}."
        )
    bad = np.flatnonzero((betas <= 0) | (betas >= 1))
    if bad.size:
        raise ValueError(
            f"every beta must lie in the open interval (0, 1); betas[{bad[0]}] = {betas[bad[0]]!r} "
            f"({bad.size} value(s) out of range)."
        )
    return betas


def schedule_from_betas(
    betas: Sequence[float] | np.ndarray, model_timesteps: Sequence[int] | np.ndarray | None = None
) -> Schedule:
    """Builds a :class:`Schedule` from betas [T] (float64 maths, float32 storage).

    ``model_timesteps`` (int [T]) is the timestep value fed to the network at each index; it defaults
    to ``arange(T)``. Raises ValueError for an empty or non-1-D array or a beta outside (0, 1).
    """
    betas = _check_betas(betas)
    num_steps = betas.shape[0]
    if model_timesteps is None:
        model_timesteps = np.arange(num_steps)
    model_timesteps = np.asarray(model_timesteps)
    if model_timesteps.shape != (num_steps,):
        raise ValueError(
            f"model_timesteps must have shape ({num_steps},) to match betas, got {model_timesteps.shape}."
        )

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta-tilde_0 is 0 (x_0 is known given x_1 and x_0), so its log is clipped to beta-tilde_1 as in
    # improved-DDPM; with T = 1 there is no later value and the (zero) variance's log is clipped to beta_0.
    log_var_floor = posterior_variance[1] if num_steps > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(log_var_floor, posterior_variance[1:]))
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)

    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - alphas_cumprod)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod - 1.0)),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
        posterior_mean_coef1=f32(posterior_mean_coef1),
        posterior_mean_coef2=f32(posterior_mean_coef2),
        snr=f32(alphas_cumprod / (1.0 - alphas_cumprod)),
        model_timesteps=jnp.asarray(model_timesteps, dtype=jnp.int32),
    )


def _check_num_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be an integer, got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    return int(num_timesteps)


def _scaled_endpoints(num_timesteps: int, beta_start: float | None, beta_end: float | None):
    """DDPM's endpoints 1e-4 and 0.02 at T=1000, scaled by 1000/T as improved-DDPM does."""
    scale = 1000.0 / num_timesteps
    start = scale * 1e-4 if beta_start is None else beta_start
    end = scale * 0.02 if beta_end is None else beta_end
    return start, end


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal (2021) eq. 17 without normalisation: f(u) = cos^2((u + s)/(1 + s) * pi/2), u=t/T."""
    return np.cos((np.asarray(u, np.float64) + s) / (1.0 + s) * math.pi / 2) ** 2


def betas_for_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """The float64 betas [T] of a named schedule.

    - ``linear``: DDPM, evenly spaced from 1e-4 to 0.02 at T=1000 (both scaled by 1000/T).
    - ``quadratic``: evenly spaced in sqrt(beta) between the same endpoints, squared.
    - ``sigmoid``: sigmoid(linspace(-6, 6, T)) mapped onto [beta_start, beta_end].
    - ``geometric``: evenly spaced in log(beta) between the same endpoints.
    - ``cosine``: Nichol & Dhariwal's alpha-bar_t = f(t/T)/f(0), beta clipped at ``max_beta``.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if name == "cosine":
        if (beta_start, beta_end) != (None, None):
            raise ValueError(
                "beta_start/beta_end do not apply to the cosine schedule: its betas come from "
                "alpha-bar = cos^2 (clipped at max_beta). Drop them, or use a linear schedule."
            )
        u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = cosine_alpha_bar(u, cosine_s)
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    if name not in SCHEDULE_NAMES:
        raise ValueError(
            f"unknown schedule {name!r}; choose one of {SCHEDULE_NAMES} or pass betas=."
        )
    start, end = _scaled_endpoints(num_timesteps, beta_start, beta_end)
    if not 0 < start <= end < 1:
        raise ValueError(
            f"schedule endpoints must satisfy 0 < beta_start <= beta_end < 1, got {start} and {end} "
            f"(with T={num_timesteps}; the default endpoints are scaled by 1000/T, so T must be >= 21)."
        )
    if name == "linear":
        return np.linspace(start, end, num_timesteps, dtype=np.float64)
    if name == "quadratic":
        return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "sigmoid":
        z = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-z)) * (end - start) + start
    return np.geomspace(start, end, num_timesteps, dtype=np.float64)  # geometric


def make_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    *,
    betas: Sequence[float] | np.ndarray | None = None,
    **kwargs: float,
) -> Schedule:
    """A :class:`Schedule` from a named schedule (see :func:`betas_for_schedule`) or explicit ``betas``.

    ``make_schedule("cosine", 1000)``; ``make_schedule(betas=my_betas)`` (then ``name`` and
    ``num_timesteps`` are ignored). Extra keyword arguments go to :func:`betas_for_schedule`.
    """
    if betas is None:
        betas = betas_for_schedule(name, num_timesteps, **kwargs)
    elif kwargs:
        raise ValueError(f"options {sorted(kwargs)} only apply to named schedules, not to betas=.")
    return schedule_from_betas(betas)


SPACINGS = ("uniform", "leading", "trailing", "quadratic")


def space_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """``num_steps`` strictly increasing 0-based timesteps out of ``num_timesteps`` (int [num_steps]).

    - ``uniform``: evenly spaced from 0 to T - 1 inclusive, rounded (improved-DDPM respacing);
      a single step is [T - 1].
    - ``leading``: 0, k, 2k, ... with k = T // num_steps (the DDIM paper's choice; misses T - 1).
    - ``trailing``: T - 1, T - 1 - T/n, ... (Lin et al. 2024; always keeps the noisiest step).
    - ``quadratic``: DDIM's quadratic spacing, denser near t = 0, ending at T - 1 (early repeats
      nudged up to consecutive steps).
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}.")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [1, {num_timesteps}] (the schedule's T), got {num_steps}."
        )
    last = num_timesteps - 1
    if spacing == "uniform":
        if num_steps == 1:
            return np.array([last])
        steps = np.round(np.linspace(0, last, num_steps))
    elif spacing == "leading":
        steps = np.arange(num_steps) * (num_timesteps // num_steps)
    elif spacing == "trailing":
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[::-1] - 1
    elif spacing == "quadratic":
        steps = np.round(np.linspace(0, np.sqrt(last), num_steps) ** 2)
        for i in range(1, num_steps):  # the first squares round to repeats: nudge them apart
            steps[i] = max(steps[i], steps[i - 1] + 1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}.")
    steps = steps.astype(np.int64)
    if len(np.unique(steps)) != num_steps:
        raise ValueError(
            f"{spacing!r} spacing of {num_steps} steps over T={num_timesteps} repeats a timestep; "
            "use fewer steps or 'uniform' spacing."
        )
    return steps


def log_alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """log alpha-bar_t [T], float64 numpy, summed from the stored per-step terms: log1p(-beta) where
    beta is small, log(alpha) where beta is near 1, so each term keeps float32's relative precision
    and so do 1 - alpha-bar (tiny at the first steps) and the ratios of alpha-bar between steps,
    which differences of the float32 alpha-bar would lose."""
    betas = np.asarray(schedule.betas, np.float64)
    alphas = np.asarray(schedule.alphas, np.float64)
    return np.cumsum(np.where(betas < 0.5, np.log1p(-np.minimum(betas, 0.5)), np.log(alphas)))


def respace(schedule: Schedule, timesteps: Sequence[int] | np.ndarray) -> Schedule:
    """The schedule restricted to increasing ``timesteps`` (improved-DDPM respacing).

    The new betas are 1 - alpha-bar_{t_i} / alpha-bar_{t_{i-1}}, so the respaced schedule has exactly
    the original alpha-bar at the kept steps; ``model_timesteps`` records the original t for the
    network. Samplers run on the result as on any schedule.
    """
    timesteps = np.asarray(timesteps)
    num_timesteps = schedule.num_timesteps
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError(
            f"timesteps must be a non-empty 1-D sequence, got shape {timesteps.shape}."
        )
    if np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= num_timesteps:
        raise ValueError(
            f"timesteps must be strictly increasing integers in [0, {num_timesteps - 1}], got {timesteps}."
        )
    # In log space (see log_alphas_cumprod): 1 - alpha-bar keeps its digits where it is tiny (the
    # first steps), which differences of the float32-stored alpha-bar lose (1.7e-4 relative).
    kept = log_alphas_cumprod(schedule)[timesteps]
    new_betas = -np.expm1(kept - np.append(0.0, kept[:-1]))
    original_t = np.asarray(schedule.model_timesteps)[timesteps]
    return schedule_from_betas(new_betas, model_timesteps=original_t)


def karras_timesteps(schedule: Schedule, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """``num_steps`` increasing timesteps whose noise levels follow Karras et al. (2022) eq. 5.

    The noise level of step t is sigma_t = sqrt((1 - abar_t) / abar_t) (the VE view of the VP
    process); the target levels (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    are snapped to the nearest timestep in log sigma, and repeats are nudged apart.
    """
    num_timesteps = schedule.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}.")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [1, {num_timesteps}] (the schedule's T), got {num_steps}."
        )
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}.")
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    log_sigmas = 0.5 * np.log((1.0 - abar) / abar)
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    inv_rho = 1.0 / rho
    s_max, s_min = np.exp(log_sigmas[-1]), np.exp(log_sigmas[0])
    ramp = np.linspace(0.0, 1.0, num_steps)
    targets = (s_max**inv_rho + ramp * (s_min**inv_rho - s_max**inv_rho)) ** rho
    steps = np.sort(np.abs(log_sigmas[None, :] - np.log(targets)[:, None]).argmin(axis=1))
    for i in range(1, num_steps):  # repeats at the low end: push up ...
        steps[i] = max(steps[i], steps[i - 1] + 1)
    steps[-1] = min(steps[-1], num_timesteps - 1)
    for i in range(num_steps - 2, -1, -1):  # ... and back down below the top, if pushed past it
        steps[i] = min(steps[i], steps[i + 1] - 1)
    return steps
