"""Packaging: a light import and a curated public API."""

import subprocess
import sys

import diffusion_jax as dj


def test_import_is_light():
    code = (
        "import sys, diffusion_jax; "
        "heavy = [m for m in ('tensorflow', 'tensorflow_datasets', 'grain', 'orbax', 'sklearn', 'optax') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import diffusion_jax pulled in {out.stdout.strip()}"


def test_public_api_is_exported():
    for name in dj.__all__:
        assert hasattr(dj, name), name
    for name in (
        "make_schedule",
        "make_sampler",
        "diffusion_loss",
        "q_sample",
        "UNet",
        "MLPDenoiser",
    ):
        assert name in dj.__all__, name
