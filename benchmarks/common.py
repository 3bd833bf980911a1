"""Setup shared by the benchmark scripts: the U-Net they time and the environment they run in.

Import it as ``from benchmarks.common import ...`` from a script run as ``python -m
benchmarks.<name>`` in the repository root (which puts ``benchmarks`` and ``configs`` on the path).
"""

from __future__ import annotations

import os
from typing import Any


def model_settings(tiny: bool) -> dict[str, Any]:
    """Our UNet's settings: configs/cifar10.py's, or a tiny net for smoke tests."""
    if tiny:
        return dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
    from configs import cifar10

    m = cifar10.get_config().model
    return dict(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
    )


def worker_env(malloc_tunables: bool, xla_flags: bool) -> dict[str, str]:
    """This process's environment for a benchmark worker: with diffusion_jax.env's malloc settings
    (one arena, no mmap, no trimming) and, where that module suggests it, its CPU XLA flags."""
    from diffusion_jax.env import CPU_MALLOC_TUNABLES, CPU_XLA_FLAGS, cpu_xla_flags_hint

    env = dict(os.environ)
    if malloc_tunables:
        env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    if xla_flags and cpu_xla_flags_hint("cpu"):  # a jaxlib it was measured on, not set by the user
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + CPU_XLA_FLAGS).strip()
    return env
