"""Editing with any sampler on any process: img2img (SDEdit) and inpainting (with RePaint resampling)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.processes import Process
from diffusion_jax.sampling.chain import DenoiseFn, check_shape, make_chain
from diffusion_jax.schedules import Schedule

_CHAIN_OPTIONS = tuple(
    name
    for name, p in inspect.signature(make_chain).parameters.items()
    if p.kind == p.KEYWORD_ONLY and name != "trajectory_steps"
)


def _chain_options(sampler_kwargs: dict[str, Any]) -> dict[str, Any]:
    """make_chain's options from ``sampler_kwargs`` (those of make_sampler, without trajectories)."""
    if sampler_kwargs.get("trajectory_steps") is not None:
        raise ValueError("trajectory_steps is not supported by the editing samplers.")
    unknown = set(sampler_kwargs) - set(_CHAIN_OPTIONS) - {"trajectory_steps"}
    if unknown:
        raise ValueError(
            f"unknown sampler options {sorted(unknown)}; known: {sorted(_CHAIN_OPTIONS)}."
        )
    return {k: v for k, v in sampler_kwargs.items() if k != "trajectory_steps"}


def make_img2img(
    denoise_fn: DenoiseFn, process: Process | Schedule, *, strength: float, **sampler_kwargs: Any
) -> Callable[..., Any]:
    """Builds ``edit(params, rng, images, **model_kwargs) -> images`` (SDEdit, Meng et al. 2022).

    The images ([B, ...], in [-1, 1]) are noised by q(x_i | x_0) to the sampler level nearest
    ``strength * S`` (strength in [0, 1]; 0 returns the input, 1 starts from the noisiest level), then
    denoised by the sampler ``sampler_kwargs`` describes (as for ``make_sampler``).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    chain = make_chain(denoise_fn, process, **_chain_options(sampler_kwargs))
    num_steps = int(round(strength * chain.num_steps))

    def edit(params: Any, rng: jax.Array, images: jax.Array, **model_kwargs: Any):
        images = jnp.asarray(images, jnp.float32)
        check_shape(images.shape)
        if num_steps == 0:
            return images
        noise_rng, loop_rng = jax.random.split(rng)
        first = num_steps - 1
        x_start = chain.noised(images, first, noise_rng)
        return chain.run(params, loop_rng, x_start, first, **model_kwargs)

    return edit


def make_inpainter(
    denoise_fn: DenoiseFn, process: Process | Schedule, *, resample: int = 1, **sampler_kwargs: Any
) -> Callable[..., Any]:
    """Builds ``inpaint(params, rng, images, mask, **model_kwargs) -> images``.

    ``mask`` (broadcastable to ``images``) is 1 where the image is known. After every reverse step
    x_i -> x_{i-1} the known region is replaced by the original noised to level i - 1 (the original
    itself after the last step), so only the unknown region is generated. ``resample > 1`` repeats
    each step but the last that many times, going back up one level with q(x_i | x_{i-1}) in between
    (RePaint, Lugmayr et al. 2022, jump length 1), to harmonise the regions.
    """
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}.")
    chain = make_chain(denoise_fn, process, **_chain_options(sampler_kwargs))
    if resample > 1 and chain.solver.history:
        raise ValueError("resample > 1 needs a one-step sampler; this one keeps a history.")
    last = chain.num_steps - 1
    prior_std = chain.prior_std

    def replace_known(x_next, i, key, ctx):
        images, mask = ctx
        known = jnp.where(i > 0, chain.noised(images, jnp.maximum(i - 1, 0), key), images)
        return mask * known + (1.0 - mask) * x_next

    def inpaint(
        params: Any, rng: jax.Array, images: jax.Array, mask: jax.Array, **model_kwargs: Any
    ):
        images = jnp.asarray(images, jnp.float32)
        check_shape(images.shape)
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), images.shape)
        init_rng, loop_rng = jax.random.split(rng)
        x_init = prior_std * jax.random.normal(init_rng, images.shape, jnp.float32)
        if resample == 1:
            return chain.run(
                params, loop_rng, x_init, last, replace_known, (images, mask), **model_kwargs
            )

        # RePaint: each step i > 0 runs `resample` times; between repeats x_{i-1} goes back up to x_i.
        # The last step (i = 0) lands on the clean image and runs once. A self-conditioning chain
        # carries the latest x0_hat through the repeats.
        def body(carry, i):
            repeats = jnp.where(i > 0, resample, 1)

            def repeat(r, carry):
                x, x0_prev = carry
                key = jax.random.fold_in(jax.random.fold_in(loop_rng, i), r)
                kwargs = chain.conditioned(model_kwargs, x0_prev)
                x_prev, x0, _ = chain.step(params, x, i, key, (), kwargs)
                x_prev = replace_known(x_prev, i, jax.random.fold_in(key, 1), (images, mask))
                up = chain.renoised(x_prev, i, jax.random.fold_in(key, 2))
                return jnp.where(r < repeats - 1, up, x_prev), chain.estimate(x0)

            return jax.lax.fori_loop(0, repeats, repeat, carry), None

        carry = (x_init, chain.initial_estimate(images.shape))
        (x0, _), _ = jax.lax.scan(body, carry, jnp.arange(last, -1, -1, dtype=jnp.int32))
        return x0

    return inpaint
