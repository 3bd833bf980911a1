"""One forward 3x3 convolution (stride 1, 'SAME', NHWC), written several ways, timed in one process.

    python benchmarks/conv_forms.py --batch 32 --size 32 --channels 128 --rounds 9
    taskset -c 0 python benchmarks/conv_forms.py --batch 32 --size 32 --channels 128  # one core
    python benchmarks/conv_forms.py --tiny  # smoke test

Forms, all the same function (their largest difference from ``lax`` is printed, relative to the
output's range):

- ``lax``: ``lax.conv_general_dilated``, as the U-Net runs it (XLA's Eigen or YNNPACK kernel);
- ``flat9``: nine dots ``x_flat[o : o + n] @ w[i, j]`` over the zero-padded input flattened to
  [B * (H + 2) * (W + 2), C], where each tap is a contiguous row offset ``o`` (the border rows
  are computed and dropped);
- ``rows3``: the three column shifts concatenated on channels, [B, H + 2, W, 3C], then three dots
  of K = 3C, one per kernel row;
- ``batch2`` / ``batch4``: ``lax`` on 2 / 4 slices of the batch, concatenated (independent ops the
  thunk executor may run side by side);
- ``cout2``: ``lax`` on 2 halves of the output channels, concatenated;
- ``torch``: ``torch.nn.functional.conv2d`` on NCHW (oneDNN), where torch is installed, with
  ``torch.get_num_threads()`` threads (``taskset`` limits both frameworks to the cores it names).

Each round calls every form once, in rotated order; the table gives medians (ms), GFLOP/s and the
per-round ratio to ``lax``. The script re-runs itself with the benchmark environment of
unet_vs_diffusers.py (malloc settings; CPU XLA flags where ``diffusion_jax.env`` suggests them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def forms() -> dict[str, Any]:
    """Form name -> f(x [B, H, W, C], w [3, 3, C, C]) -> [B, H, W, C], all un-jitted."""
    import jax.numpy as jnp
    from jax import lax

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def flat9(x, w):
        b, h, wd, c = x.shape
        row = wd + 2
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, c)
        n = xp.shape[0]
        xp = jnp.pad(xp, ((row + 1, row + 1), (0, 0)))
        out = sum(
            xp[(i * row + j) : (i * row + j) + n] @ w[i, j] for i in range(3) for j in range(3)
        )
        return out.reshape(b, h + 2, wd + 2, -1)[:, 1:-1, 1:-1]

    def rows3(x, w):
        h, wd, c = x.shape[1:]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x3 = jnp.concatenate([xp[:, :, j : j + wd] for j in range(3)], axis=-1)
        return sum(x3[:, i : i + h] @ w[i].reshape(3 * c, -1) for i in range(3))

    def split(parts):
        return lambda x, w: jnp.concatenate([conv(p, w) for p in jnp.split(x, parts)], 0)

    def cout2(x, w):
        return jnp.concatenate([conv(x, half) for half in jnp.split(w, 2, axis=-1)], -1)

    return {"lax": conv, "flat9": flat9, "rows3": rows3, "batch2": split(2), "batch4": split(4),
            "cout2": cout2}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    b, s, c = args.batch, args.size, args.channels
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, s, s, c)).astype(np.float32)
    w = (rng.normal(size=(3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
    calls = {
        name: (jax.jit(f), (jax.numpy.asarray(x), jax.numpy.asarray(w)))
        for name, f in forms().items()
    }
    ref = np.asarray(calls["lax"][0](*calls["lax"][1]), np.float64)
    scale = float(np.abs(ref).max())
    errors = {
        n: float(np.abs(np.asarray(f(*a), np.float64) - ref).max()) / scale
        for n, (f, a) in calls.items()
    }
    threads = None
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        pass
    else:
        threads = torch.get_num_threads()
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        out = F.conv2d(xt, wt, padding=1).numpy().transpose(0, 2, 3, 1)
        errors["torch"] = float(np.abs(out - ref).max()) / scale
        calls["torch"] = (lambda xt, wt: F.conv2d(xt, wt, padding=1), (xt, wt))

    def once(name: str) -> float:
        f, a = calls[name]
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        return time.perf_counter() - t0

    names = list(calls)
    for name in names:  # warm-up (compiles)
        once(name), once(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(once(name))
    flops = 2 * b * s * s * 9 * c * c
    rows = {}
    for n in names:
        ratios = [t / base for t, base in zip(times[n], times["lax"], strict=True)]
        med = statistics.median(times[n])
        rows[n] = {"median_s": med, "min_s": min(times[n]), "gflops": flops / med / 1e9,
                   "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                   "max_rel_error": errors[n], "times": times[n]}  # fmt: skip
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "shape": {"batch": b, "size": s, "channels": c}, "torch_threads": threads,
            "cpu_affinity": sorted(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load": open("/proc/loadavg").read().split()[:3], "forms": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tiny", action="store_true", help="batch 4, 8x8, 8 channels, 2 rounds")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--no_malloc_tunables", action="store_true")
    parser.add_argument("--no_xla_flags", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.size, args.channels, args.rounds = 4, 8, 8, 2
    from unet_vs_diffusers import reexec_with_env

    reexec_with_env(__file__, not args.no_malloc_tunables, not args.no_xla_flags)
    report = run(args)
    print(
        f"forward 3x3 conv {report['shape']}, cores {report['cpu_affinity']}, load {report['load']}"
    )
    print(f"{'form':8} {'median ms':>10} {'GFLOP/s':>8} {'ratio to lax (range)':>24} {'error':>9}")
    for n, r in report["forms"].items():
        lo, hi = r["ratio_range"]
        print(
            f"{n:8} {1e3 * r['median_s']:10.2f} {r['gflops']:8.0f} {r['ratio_median']:10.3f} [{lo:.3f}, {hi:.3f}] {r['max_rel_error']:9.1e}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
