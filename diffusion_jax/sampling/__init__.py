"""Samplers for every noise process, each compiled as one program (``make_sampler(...) -> sample``).

- :mod:`~diffusion_jax.sampling.chain`: the scan over the noise levels, ``make_sampler``;
- :mod:`~diffusion_jax.sampling.solvers`: one function per sampler and :data:`SAMPLERS`, the only
  list of their names;
- :mod:`~diffusion_jax.sampling.guidance`: classifier-free and classifier guidance;
- :mod:`~diffusion_jax.sampling.editing`: img2img and inpainting.
"""

from diffusion_jax.reverse import VARIANCES, p_mean_variance
from diffusion_jax.sampling.chain import DenoiseFn, make_chain, make_sampler
from diffusion_jax.sampling.editing import make_img2img, make_inpainter
from diffusion_jax.sampling.guidance import classifier_free_guidance, classifier_guidance
from diffusion_jax.sampling.solvers import ODE_SAMPLERS, SAMPLERS, SOLVERS

__all__ = [
    "DenoiseFn",
    "ODE_SAMPLERS",
    "SAMPLERS",
    "SOLVERS",
    "VARIANCES",
    "classifier_free_guidance",
    "classifier_guidance",
    "make_chain",
    "make_img2img",
    "make_inpainter",
    "make_sampler",
    "p_mean_variance",
]
