"""Compile time of a sampling chain versus its number of steps (it should not grow).

    python -m benchmarks.sampler_compile          # --tiny: a smoke test (8x8, batch 1, 2 samplers)

Prints a table: sampler, steps, compile seconds (lower + compile), run seconds, for a small U-Net
(ch=32, ch_mult=(1, 2), one res block, attention at 8x8) on 16x16x1 images, batch 4.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import diffusion_jax as dj
from diffusion_jax.models import UNet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="8x8 images, batch 1, ddim at 2/10 steps"
    )
    args = parser.parse_args(argv)
    size = 8 if args.tiny else 16
    model = UNet(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(size // 2,), dropout=0.0
    )
    shape = (1 if args.tiny else 4, size, size, 1)
    t = jnp.zeros(shape[:1], jnp.int32)
    params = model.init(jax.random.key(0), jnp.zeros(shape), t)["params"]
    denoise = lambda p, x, t: model.apply({"params": p}, x, t)
    schedule = dj.make_schedule("linear", 1000)
    rows = []
    runs = (
        ("ddpm", 1000), ("ddpm", 10), ("ddim", 1000), ("ddim", 10),
        ("heun", 1000), ("heun", 10), ("dpm_solver_2m", 1000), ("dpm_solver_2m", 10),
    )  # fmt: skip
    for sampler, steps in (("ddim", 2), ("ddim", 10)) if args.tiny else runs:
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
