"""Compile time of a sampling chain versus its number of steps (it should not grow).

    python benchmarks/sampler_compile.py

Prints a table: sampler, steps, compile seconds (lower + compile), run seconds, for a small U-Net
(ch=32, ch_mult=(1, 2), one res block, attention at 8x8) on 16x16x1 images, batch 4.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import diffusion_jax as dj
from diffusion_jax.models import UNet


def main() -> None:
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    shape = (4, 16, 16, 1)
    params = model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((4,), jnp.int32))["params"]
    denoise = lambda p, x, t: model.apply({"params": p}, x, t)
    schedule = dj.make_schedule("linear", 1000)
    rows = []
    for sampler, steps in (
        ("ddpm", 1000), ("ddpm", 10), ("ddim", 1000), ("ddim", 10),
        ("heun", 1000), ("heun", 10), ("dpm_solver_2m", 1000), ("dpm_solver_2m", 10),
    ):  # fmt: skip
        sample = jax.jit(
            dj.make_sampler(denoise, schedule, sampler=sampler, num_steps=steps), static_argnums=2
        )
        t0 = time.perf_counter()
        compiled = sample.lower(params, jax.random.key(1), shape).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(1)))
        run_s = time.perf_counter() - t0
        rows.append((sampler, steps, compile_s, run_s))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'sampler':<14} {'steps':>6} {'compile s':>10} {'run s':>8}")
    for sampler, steps, c, r in rows:
        print(f"{sampler:<14} {steps:>6} {c:>10.2f} {r:>8.2f}")


if __name__ == "__main__":
    main()
