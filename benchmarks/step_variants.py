"""Variants of our training step (or forward pass), timed against each other in one process.

    python benchmarks/step_variants.py --batch 32 --variant base --variant xla_grad:taps=0
    python benchmarks/step_variants.py --variant base \
        --variant nosched:xla_cpu_enable_concurrency_optimized_scheduler=false
    python benchmarks/step_variants.py --tiny --rounds 2 --variant a --variant b:taps=0  # smoke

On this shared 2-core machine one step's time drifts by 10-30% within minutes, more than most
changes worth trying. Here every variant is compiled in the same process and the rounds call each
variant's step once, in rotated order, so neighbouring calls share the machine's state; the
report is each variant's median and min, and its per-round ratio to the first variant (median and
range). A variant is ``NAME`` or ``NAME:key=value,...`` with keys

- ``taps``: 1 / 0 forces models/conv.py's per-tap kernel gradient on / off (default: the
  library's own choice, see ``conv.xla_kernel_grad_on_ynnpack``);
- ``dense``: 1 forces models/dense.py's x^T kernel gradient for the Dense layers at any size,
  0 gives them autodiff's plain ``lax.dot_general`` (default: the route from ``dense.MIN_ROWS``
  rows);
- ``custom_grads``: 0 for ``UNet(custom_grads=False)`` (flax's GroupNorm, Dense and convolutions);
- anything else: an XLA compiler option for this program only (``compiler_options`` of
  ``jax.jit(...).lower(...).compile``), e.g. ``xla_cpu_enable_concurrency_optimized_scheduler``.

The model is configs/cifar10.py's U-Net (``--tiny``: a small one), float32, Adam, the eps loss.
The script re-runs itself with ``diffusion_jax.env``'s malloc settings (``--no_malloc_tunables``
to skip) and, where that module suggests them, its CPU XLA flags (``--no_xla_flags``).
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


def parse_variant(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """'name:k=v,...' -> (name, model/gradient settings, XLA compiler options)."""
    name, _, rest = spec.partition(":")
    if not name:
        raise SystemExit(f"step_variants.py: --variant {spec!r}: give it a name, e.g. 'base'.")
    settings: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"step_variants.py: --variant {spec!r}: {item!r} is not key=value.")
        if key in ("taps", "dense", "custom_grads"):
            if value not in ("0", "1"):
                raise SystemExit(f"step_variants.py: --variant {spec!r}: {key} takes 0 or 1.")
            settings[key] = value == "1"
        else:
            low = value.lower()
            options[key] = {"true": True, "false": False}.get(
                low, int(value) if value.isdigit() else value
            )
    return name, settings, options


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax
    from unet_vs_diffusers import model_settings

    import diffusion_jax as dj
    from diffusion_jax.models import UNet
    from diffusion_jax.models import conv as conv_lib
    from diffusion_jax.models import dense as dense_lib

    batch, size = args.batch, (8 if args.tiny else 32)
    schedule = dj.make_schedule("linear", 1000)
    tx = optax.adam(2e-4)
    x0 = jax.random.normal(jax.random.key(2), (batch, size, size, 3))
    t_fwd = jnp.zeros((batch,), jnp.int32)

    def make_step(model):
        def loss_fn(p, rng):
            loss_rng, dropout_rng = jax.random.split(rng)

            def model_fn(x_t, t):
                return model.apply({"params": p}, x_t, t, train=True, rngs={"dropout": dropout_rng})

            return jnp.mean(dj.diffusion_loss(schedule, model_fn, x0, loss_rng))

        def train_step(params, opt_state, rng):
            loss, grads = jax.value_and_grad(loss_fn)(params, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def forward(params, opt_state, rng):
            out = model.apply({"params": params}, x0, t_fwd, train=False)
            return params, opt_state, jnp.sum(out)

        return forward if args.forward else train_step

    variants: dict[str, dict[str, Any]] = {}
    for spec in args.variant:
        name, settings, options = parse_variant(spec)
        if name in variants:
            raise SystemExit(f"step_variants.py: two variants named {name!r}.")
        model = UNet(**model_settings(args.tiny), custom_grads=settings.get("custom_grads", True))
        params = jax.jit(model.init)(
            jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32)
        )["params"]
        opt_state = tx.init(params)
        saved = (
            conv_lib.TAP_MIN_ROWS,
            conv_lib.xla_kernel_grad_on_ynnpack,
            dense_lib.MIN_ROWS,
            dense_lib.dot_general,
        )
        if settings.get("dense") is True:
            dense_lib.MIN_ROWS = 1
        elif settings.get("dense") is False:
            dense_lib.dot_general = jax.lax.dot_general
        if settings.get("taps") is False:
            conv_lib.TAP_MIN_ROWS = 2**62
        elif settings.get("taps") is True:
            conv_lib.xla_kernel_grad_on_ynnpack = lambda: True
            if args.tiny:  # the tiny net has too few rows for the taps otherwise
                conv_lib.TAP_MIN_ROWS = 1
        try:
            step = jax.jit(make_step(model), donate_argnums=() if args.forward else (0, 1))
            start = time.perf_counter()
            lowered = step.lower(params, opt_state, jax.random.key(1))
            try:
                compiled = lowered.compile(compiler_options=options or None)
            except jax.errors.JaxRuntimeError as err:
                if not options:
                    raise
                raise SystemExit(
                    f"step_variants.py: --variant {spec!r}: XLA refused its options: {err}. "
                    "See the xla_cpu_* fields of XLA's DebugOptions (xla.proto) for your jaxlib."
                ) from None
            compile_s = time.perf_counter() - start
        finally:
            (
                conv_lib.TAP_MIN_ROWS,
                conv_lib.xla_kernel_grad_on_ynnpack,
                dense_lib.MIN_ROWS,
                dense_lib.dot_general,
            ) = saved
        state = [params, opt_state]
        for i in range(2):  # warm-up: first calls fault in the pages of the program's buffers
            state[0], state[1], loss = compiled(state[0], state[1], jax.random.key(i))
            loss.block_until_ready()
        variants[name] = dict(
            compiled=compiled, state=state, settings=settings, options=options, compile_s=compile_s
        )
        print(f"{name}: compiled in {compile_s:.1f} s", flush=True)

    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            v = variants[n]
            start = time.perf_counter()
            v["state"][0], v["state"][1], loss = v["compiled"](*v["state"], jax.random.key(100 + r))
            loss.block_until_ready()
            times[n].append(time.perf_counter() - start)
        loads.append(
            float(open("/proc/loadavg").read().split()[0])
            if os.path.exists("/proc/loadavg")
            else -1.0
        )

    base = names[0]
    report: dict[str, Any] = {
        "batch": batch,
        "case": "forward" if args.forward else "train",
        "tiny": args.tiny,
        "rounds": args.rounds,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc_tunables": "GLIBC_TUNABLES" in os.environ,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "load_per_round": loads,
        "base": base,
        "variants": {},
    }
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[base], strict=True)]
        report["variants"][n] = {
            "settings": variants[n]["settings"],
            "compiler_options": {k: str(v) for k, v in variants[n]["options"].items()},
            "compile_s": variants[n]["compile_s"],
            "times": times[n],
            "median": statistics.median(times[n]),
            "min": min(times[n]),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return report


def print_report(rep: dict[str, Any]) -> None:
    print(
        f"{rep['case']} step, batch {rep['batch']}, {rep['rounds']} rounds, {rep['device']}, "
        f"jax {rep['jax']}; XLA_FLAGS={rep['xla_flags']!r}; load per round "
        + " ".join(f"{x:.2f}" for x in rep["load_per_round"])
    )
    print(f"| variant | median s | min s | ratio to {rep['base']}: median [min, max] |")
    print("| --- | --- | --- | --- |")
    for n, v in rep["variants"].items():
        print(
            f"| {n} | {v['median']:.3f} | {v['min']:.3f} | "
            f"{v['ratio_median']:.3f} [{v['ratio_min']:.3f}, {v['ratio_max']:.3f}] |"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=None, help="NAME[:key=value,...]")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (--tiny 2)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--forward", action="store_true", help="time the forward pass instead")
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net: a smoke test")
    parser.add_argument("--no_malloc_tunables", action="store_true")
    parser.add_argument("--no_xla_flags", action="store_true", help="without CPU_XLA_FLAGS")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    args.variant = args.variant or ["base", "xla_grad:taps=0"]
    for spec in args.variant:
        parse_variant(spec)  # bad specs fail before the re-run and the compiles
    if args.batch is None:
        args.batch = 2 if args.tiny else 8
    if args.batch < 1 or args.rounds < 1:
        raise SystemExit("step_variants.py: --batch and --rounds must be at least 1.")
    if argv is None:
        from unet_vs_diffusers import reexec_with_env

        reexec_with_env(__file__, not args.no_malloc_tunables, not args.no_xla_flags)
    rep = run(args)
    print_report(rep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


if __name__ == "__main__":
    main()
