"""The U-Net's convolutions one by one: the XLA kernels our model runs against PyTorch's (oneDNN).

    python benchmarks/conv_kernels.py                      # batch 32, 3 rounds
    python benchmarks/conv_kernels.py --batch 8 --out /tmp/conv_kernels.json
    python benchmarks/conv_kernels.py --tiny               # smoke test: tiny net, seconds

Needs torch for the comparison (install as for unet_vs_diffusers.py); without it only our side
runs. The convolutions are found by running configs/cifar10.py's U-Net under flax's method
interceptor: every ``nn.Conv`` call, with its input shape, kernel, strides and padding. Each
distinct shape is timed at ``--batch``:

- forward: the convolution plus its bias, as the layer computes it -- ours ``jax.jit`` of
  ``diffusion_jax.models.conv.conv_general_dilated`` (the model's convolution), theirs
  ``F.conv2d`` on NCHW tensors under ``no_grad`` (as diffusers runs it; an asymmetric padding is an
  ``F.pad`` first, as in diffusers' ``Downsample2D``);
- train: forward and backward (input, kernel and bias gradients; no input gradient for the
  network's first convolution, whose input is data), ours one jitted ``jax.vjp``, theirs autograd.

Each framework runs in its own fresh process per round (issue 7 found the two slow each other down
in one process), with the malloc settings of ``diffusion_jax.env`` unless ``--no_malloc_tunables``
and, where that module suggests it, its ``CPU_XLA_FLAGS`` (convolutions on XLA's Eigen kernels
rather than YNNPACK's) unless ``--no_xla_flags``; rounds alternate who goes first. A round's time is the median of ``--reps`` calls after a warm-up
call. The table gives per shape the medians over rounds, GFLOP/s (2 * multiply-adds) and the
ratio ours/theirs; the last rows weight each shape by how often the network calls it, i.e. the
time the convolutions alone take in one forward pass and in one training step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from unet_vs_diffusers import model_settings, worker_env  # noqa: E402


def conv_calls(tiny: bool) -> list[dict[str, Any]]:
    """Every convolution of the U-Net's forward pass at batch 1, in call order."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax import lax

    from diffusion_jax.models import UNet

    size = 8 if tiny else 32
    calls: list[dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Conv) and context.method_name == "__call__":
            _, h, w, ci = args[0].shape
            k = tuple(m.kernel_size)
            s = tuple(m.strides or (1, 1)) if not isinstance(m.strides, int) else (m.strides,) * 2
            pad = m.padding
            if isinstance(pad, str):
                pad = lax.padtype_to_pads((h, w), k, s, pad)
            pad = [tuple(p) if not isinstance(p, int) else (p, p) for p in pad]
            calls.append(dict(h=h, w=w, ci=ci, co=m.features, k=list(k), s=list(s), pad=pad))
        return next_fun(*args, **kwargs)

    model = UNet(**model_settings(tiny))
    x, t = jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))
    return calls


def shape_key(c: dict[str, Any]) -> str:
    pad = "x".join(f"{lo}{hi}" for lo, hi in c["pad"])
    return f"{c['h']}x{c['w']} {c['ci']}->{c['co']} k{c['k'][0]}s{c['s'][0]}p{pad}"


def flops(c: dict[str, Any], batch: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one call at ``batch``."""
    ho = (c["h"] + sum(c["pad"][0]) - c["k"][0]) // c["s"][0] + 1
    wo = (c["w"] + sum(c["pad"][1]) - c["k"][1]) // c["s"][1] + 1
    return 2.0 * batch * ho * wo * c["ci"] * c["co"] * c["k"][0] * c["k"][1]


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _time_jax(c: dict[str, Any], batch: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models.conv import conv_general_dilated

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, c["h"], c["w"], c["ci"]))
    w = jax.random.normal(kw, (*c["k"], c["ci"], c["co"])) / (c["ci"] * 9) ** 0.5
    b = jnp.zeros((c["co"],))

    def conv(x, w, b):
        dn = ("NHWC", "HWIO", "NHWC")
        return conv_general_dilated(x, w, c["s"], c["pad"], dimension_numbers=dn) + b

    fwd = jax.jit(conv)
    if c["first"]:  # the network's input is data: no input gradient
        train = jax.jit(lambda x, w, b, g: jax.vjp(lambda w, b: conv(x, w, b), w, b)[1](g))
    else:
        train = jax.jit(lambda x, w, b, g: jax.vjp(conv, x, w, b)[1](g))
    g = jax.random.normal(kg, fwd(x, w, b).shape)
    return {
        "forward": _median_time(lambda: jax.block_until_ready(fwd(x, w, b)), reps),
        "train": _median_time(lambda: jax.block_until_ready(train(x, w, b, g)), reps),
    }


def _time_torch(c: dict[str, Any], batch: int, reps: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(0)
    (pt, pb), (pl, pr) = c["pad"]
    x = torch.randn(batch, c["ci"], c["h"], c["w"])
    w = (torch.randn(c["co"], c["ci"], *c["k"]) / (c["ci"] * 9) ** 0.5).requires_grad_()
    b = torch.zeros(c["co"], requires_grad=True)

    def conv(x):
        if pt == pb and pl == pr:
            return F.conv2d(x, w, b, tuple(c["s"]), (pt, pl))
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, tuple(c["s"]))

    with torch.no_grad():
        g = torch.randn_like(conv(x))
    xg = x.clone().requires_grad_(not c["first"])  # the network's input is data: no gradient

    def fwd():
        with torch.no_grad():
            conv(x)

    def train():
        w.grad = b.grad = xg.grad = None
        conv(xg).backward(g)

    return {"forward": _median_time(fwd, reps), "train": _median_time(train, reps)}


def distinct_shapes(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per shape, with ``count`` (calls per forward) and ``first`` (the input conv)."""
    shapes: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(calls):
        key = shape_key(c) + (" (input)" if i == 0 else "")
        if key not in shapes:
            shapes[key] = dict(c, count=0, first=i == 0)
        shapes[key]["count"] += 1
    return list(shapes.values())


def _have_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def run(args: argparse.Namespace) -> dict[str, Any]:
    shapes = distinct_shapes(conv_calls(args.tiny))
    env = worker_env(not args.no_malloc_tunables, not args.no_xla_flags)
    sides = ["ours", "theirs"] if _have_torch() and not args.no_torch else ["ours"]
    times: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    loads = []
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", side]
            cmd += ["--batch", str(args.batch), "--reps", str(args.reps)]
            req = json.dumps(shapes)
            proc = subprocess.run(cmd, input=req, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(
                    f"conv_kernels.py: the {side} worker failed:\n{proc.stderr[-3000:]}"
                )
            times[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        with open("/proc/loadavg") as f:
            loads.append(float(f.read().split()[0]))

    rows = []
    for c in shapes:
        key = shape_key(c)
        fl = flops(c, args.batch)
        row: dict[str, Any] = {
            "shape": key,
            "count": c["count"],
            "first": c["first"],
            "gflop": fl / 1e9,
        }
        for side in sides:
            for case in ("forward", "train"):
                row[f"{side}_{case}"] = statistics.median(t[key][case] for t in times[side])
        rows.append(row)

    def total(side: str, case: str) -> float:
        return sum(r["count"] * r[f"{side}_{case}"] for r in rows)

    totals = {f"{s}_{c}": total(s, c) for s in sides for c in ("forward", "train")}
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "batch": args.batch,
        "rounds": args.rounds,
        "reps": args.reps,
        "load_per_round": loads,
        "xla_flags": env.get("XLA_FLAGS", ""),
        "rows": rows,
        "totals": totals,
    }


def print_report(rep: dict[str, Any]) -> None:
    b = rep["batch"]
    theirs = "theirs_forward" in rep["rows"][0]
    print(
        f"\nconvolutions of the U-Net at batch {b}, float32; load per round {rep['load_per_round']}"
    )
    print(f"our worker's XLA_FLAGS={rep['xla_flags']!r}")
    head = "| shape | calls | fwd ours ms (GF/s) |"
    head += " fwd torch ms (GF/s) | ratio | train ours ms (GF/s) | train torch ms (GF/s) | ratio |"
    print(head if theirs else "| shape | calls | fwd ours ms (GF/s) | train ours ms (GF/s) |")
    print("|" + "---|" * (8 if theirs else 4))

    def cell(t: float, fl: float) -> str:
        return f"{t * 1e3:.2f} ({fl / t / 1e9:.0f})"

    for r in rep["rows"]:
        fl = r["gflop"] * 1e9
        fl_train = fl * (2 if r["first"] else 3)
        name = r["shape"] + (" (input)" if r["first"] else "")
        if theirs:
            print(
                f"| {name} | {r['count']} | {cell(r['ours_forward'], fl)} | "
                f"{cell(r['theirs_forward'], fl)} | {r['ours_forward'] / r['theirs_forward']:.2f} | "
                f"{cell(r['ours_train'], fl_train)} | {cell(r['theirs_train'], fl_train)} | "
                f"{r['ours_train'] / r['theirs_train']:.2f} |"
            )
        else:
            ours = f"{cell(r['ours_forward'], fl)} | {cell(r['ours_train'], fl_train)}"
            print(f"| {name} | {r['count']} | {ours} |")
    t = rep["totals"]
    fl_f = sum(r["count"] * r["gflop"] for r in rep["rows"]) * 1e9
    fl_t = sum(r["count"] * r["gflop"] * (2 if r["first"] else 3) for r in rep["rows"]) * 1e9
    for case, fl in (("forward", fl_f), ("train", fl_t)):
        ours = t[f"ours_{case}"]
        line = f"all convolutions, one {case}: ours {ours:.3f} s ({fl / ours / 1e9:.0f} GF/s)"
        if theirs:
            peer = t[f"theirs_{case}"]
            line += f", torch {peer:.3f} s ({fl / peer / 1e9:.0f} GF/s), ratio {ours / peer:.2f}"
        print(line)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default 32 (--tiny 2)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--tiny 1)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per shape and round")
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net: a smoke test")
    parser.add_argument("--no_torch", action="store_true", help="only our side")
    parser.add_argument("--no_malloc_tunables", action="store_true")
    parser.add_argument(
        "--no_xla_flags", action="store_true", help="without diffusion_jax.env.CPU_XLA_FLAGS"
    )
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.tiny else 32
    if args.rounds is None:
        args.rounds = 1 if args.tiny else 3
    if args.batch < 1 or args.rounds < 1 or args.reps < 1:
        parser.error("--batch, --rounds and --reps must be positive")
    if args.worker:
        shapes = json.loads(sys.stdin.read())
        time_one = _time_jax if args.worker == "ours" else _time_torch
        print(json.dumps({shape_key(c): time_one(c, args.batch, args.reps) for c in shapes}))
        return None
    rep = run(args)
    print_report(rep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


if __name__ == "__main__":
    main()
