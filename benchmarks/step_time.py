r"""Seconds per training step of whole configs on this machine: the U-Net against DiT, and any other.

    python -m benchmarks.step_time                                    # cifar10 vs cifar10_dit, batch 8
    python -m benchmarks.step_time --configs digits,digits_dit --batch_size 64
    python -m benchmarks.step_time --configs cifar10_dit --set model.size=B/2 --batch_size 4
    python -m benchmarks.step_time --tiny                             # smoke test: seconds

Each config's training step is built as ``train.py`` builds it (optimiser, EMA, sharding over the
local devices) and timed on random data after two warm-up steps (:func:`benchmarks.common.time_train_step`);
the table gives the parameter count, the first step (compilation), the median step and the CPU time
per step (all threads; steadier than wall time when other jobs share the machine). For an
accelerator's estimate of the same programs without the accelerator, use
``python -m diffusion_jax.aot --config configs/<name>.py --topology v5e:2x2``.
"""

from __future__ import annotations

import argparse
import importlib
import json

from benchmarks.common import time_train_step


def load_config(name: str, batch_size: int | None, overrides: list[str]):
    """``configs/<name>.py``'s config with ``--batch_size`` and ``key.sub=value`` overrides."""
    import ast

    config = importlib.import_module(f"configs.{name}").get_config()
    if batch_size is not None:
        config.train.batch_size = batch_size
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as B/2
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[leaf] = value
    return config


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="cifar10,cifar10_dit", help="names in configs/")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per config")
    parser.add_argument(
        "--set", action="append", default=[], help="a config override key=value (repeatable)"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny and a one-block digits_dit, 2 steps"
    )
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    if args.tiny:
        names, args.steps = ["tiny", "digits_dit"], 2

    import jax

    rows = []
    print(
        f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s)\n\n"
        "| config | model | parameters | batch | first step s | step ms | CPU ms per step | images/s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        flush=True,
    )
    for name in names:
        extra = ["model.depth=1"] if args.tiny and name == "digits_dit" else []
        config = load_config(name, args.batch_size, [*args.set, *extra])
        r = time_train_step(config, steps=args.steps)
        model = config.model.name + (f" {config.model.size}" if config.model.get("size") else "")
        row = {"config": name, "model": model, **r}
        rows.append(row)
        print(
            f"| {name} | {model} | {r['num_params']:,} | {r['batch_size']} | "
            f"{r['compile_seconds']:.1f} | {1e3 * r['step_seconds']:.1f} | "
            f"{1e3 * r['step_cpu_seconds']:.1f} | "
            f"{r['batch_size'] / r['step_seconds']:.1f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
