"""Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Both are process-agnostic: classifier-free guidance mixes the network outputs (an affine map of x_0
under every parameterisation), and classifier guidance gives the sampler grad_x log p(y | x_t),
which the chain applies to eps_hat (score form) or to the ancestral mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.sampling.chain import DenoiseFn


def classifier_free_guidance(denoise_fn: DenoiseFn, null_label: int) -> DenoiseFn:
    """Wraps a class-conditional denoiser for classifier-free guidance (Ho & Salimans 2022).

    The result is ``guided(params, x_t, t, *, y, guidance_scale=1.0, **kw)`` returning
    uncond + guidance_scale * (cond - uncond), with both evaluations batched into one call of
    ``denoise_fn(params, x, t, y=..., **kw)`` (``null_label`` is the "no class" label). Scale 0 is the
    unconditional model, 1 the conditional one. A learned-variance channel half is taken from the
    conditional evaluation unguided. A self-conditioning sampler's ``x_self_cond`` (shaped like
    ``x_t``) is given to both evaluations.
    """

    def guided(params, x_t, t, *, y, guidance_scale=1.0, **kwargs):
        # (1 - w) uncond + w cond == uncond + w (cond - uncond), exact at w = 0 and w = 1.
        mix = lambda cond, uncond: (1.0 - guidance_scale) * uncond + guidance_scale * cond
        batch = x_t.shape[0]
        y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
        if kwargs.get("x_self_cond") is not None:
            kwargs["x_self_cond"] = jnp.concatenate([kwargs["x_self_cond"]] * 2)
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
