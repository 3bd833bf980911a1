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
    Returns ``{"bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "vb_bpd": [T], "num_examples"}``
    (floats, bits/dim; ``vb_bpd`` the per-timestep means, 0-based t, summing with ``prior_bpd`` to
    ``bpd``).
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
        priors.append(np.asarray(out["prior_bpd"][:n], np.float64))
        vbs.append(np.asarray(out["vb_bpd"][:n], np.float64))
    if not totals:
        raise ValueError("evaluate_bpd got no data.")
    total, prior, vb = np.concatenate(totals), np.concatenate(priors), np.concatenate(vbs)
    stderr = float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else float("nan")
    return {
        "bpd": float(total.mean()),
        "bpd_stderr": stderr,
        "prior_bpd": float(prior.mean()),
        "decoder_bpd": float(vb[:, 0].mean()),
        "vb_bpd": vb.mean(axis=0),
        "num_examples": int(len(total)),
    }
