r"""The CIFAR-10 U-Net's programs compiled for TPU topologies, as the TPU compiler sees them.

    python -m benchmarks.tpu_compile [--only v5e_b128,v4_b128] [--json report.json] [--hlo_dir DIR]

No TPU needed (libtpu's compiler runs on the CPU; see ``diffusion_jax.aot``). Each case is the
training step of ``configs/cifar10.py`` (35.7M-parameter U-Net, 32x32x3, Adam + EMA) built exactly as
``train.py`` builds it, compiled for one topology; the sampler cases compile the 50-step DDIM and
the 1000-step ancestral chains for 256 images. The table gives per chip: memory against HBM,
flops and bytes, the compiler's own time estimate (``optimal_seconds``, corrected as
``diffusion_jax.aot`` explains; an estimate, not a timing), a roofline from flops and bytes,
images/s and FLOP utilisation against the chip's bf16 peak derived from the estimate, and the
collectives. One case takes 3-30 minutes to compile on 2 CPU cores; all of them, hours.
``--tiny`` compiles ``configs/tiny.py``'s step on v5e:2x2 instead (the smoke test);
``--breakdown N`` also prints, per program, the share of the estimated time and the bytes moved by
kind of kernel, and its N most expensive kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from diffusion_jax import aot

# name: (topology, config overrides). bf16 compute with float32 parameters unless stated.
BF16 = {"model.dtype": "bfloat16"}
CASES: dict[str, tuple[str, dict]] = {
    "v5e_b128": ("v5e:2x2", {**BF16, "train.batch_size": 128}),
    "v5e_b256": ("v5e:2x2", {**BF16, "train.batch_size": 256}),
    "v5e_b256_fsdp": (
        "v5e:2x2",
        {**BF16, "train.batch_size": 256, "sharding.fsdp_min_size": 65536},
    ),
    "v5e_b128_fsdp": (
        "v5e:2x2",
        {**BF16, "train.batch_size": 128, "sharding.fsdp_min_size": 65536},
    ),
    "v5e_f32_b128": ("v5e:2x2", {"train.batch_size": 128}),
    "v4_b128": ("v4:2x2x1", {**BF16, "train.batch_size": 128}),
    "v5p_b128": ("v5p:2x2x1", {**BF16, "train.batch_size": 128}),
    "v6e_b128": ("v6e:2x2", {**BF16, "train.batch_size": 128}),
    "v5e_4x4_b512": ("v5e:4x4", {**BF16, "train.batch_size": 512}),
    "v5e_4x4_b512_fsdp": (
        "v5e:4x4",
        {**BF16, "train.batch_size": 512, "sharding.fsdp_min_size": 65536},
    ),
    "v5e_2x4_b256": ("v5e:2x4", {**BF16, "train.batch_size": 256}),
    "v4_2x2x2_b256": ("v4:2x2x2", {**BF16, "train.batch_size": 256}),
    "v4_2x2x2_b256_fsdp": (
        "v4:2x2x2",
        {**BF16, "train.batch_size": 256, "sharding.fsdp_min_size": 65536},
    ),
}
SAMPLER_CASES = {"v5e_samplers": ("v5e:2x2", BF16)}
SAMPLERS = [("ddim", 50), ("ddpm", None)]


def _config(name: str, overrides: dict):
    from configs import cifar10, tiny

    config = (tiny if name == "tiny" else cifar10).get_config()
    config.sample.num_samples = 0  # the training run's sample grid: not part of a step
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--json", default=None, help="write the reports here")
    parser.add_argument("--hlo_dir", default=None, help="write each optimised HLO text here")
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.py on v5e:2x2 only")
    parser.add_argument(
        "--breakdown", type=int, default=0, help="also print where the time goes (N top kernels)"
    )
    args = parser.parse_args(argv)

    if args.tiny:
        plan = [("tiny", "v5e:2x2", {"train.batch_size": 16}, [], 8)]
    else:
        names = [n for n in args.only.split(",") if n] or [*CASES, *SAMPLER_CASES]
        unknown = set(names) - set(CASES) - set(SAMPLER_CASES)
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; known: {[*CASES, *SAMPLER_CASES]}")
        plan = []
        for n in names:
            if n in CASES:
                plan.append((n, *CASES[n], [], 256))
            else:
                plan.append((n, *SAMPLER_CASES[n], SAMPLERS, 256))

    reports = []
    for name, topology, overrides, samplers, sample_batch in plan:
        print(f"[{name}] compiling for {topology} ...", file=sys.stderr, flush=True)
        case = aot.compile_programs(
            _config(name, overrides), topology, samplers=samplers, sample_batch=sample_batch,
            forward=bool(samplers), train=not samplers, hlo_dir=args.hlo_dir,
            breakdown=args.breakdown,
            log=lambda s: print(f"  {s}", file=sys.stderr, flush=True),
        )  # fmt: skip
        for r in case:
            r.program = f"{name}: {r.program}"
        reports += case
        print("\n".join(aot.table(case).splitlines()[2:]), file=sys.stderr, flush=True)
        if args.json:  # after every case: a long run keeps what it finished
            with open(args.json, "w") as f:
                json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    print(aot.table(reports))
    return 0 if all(r.compiled for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
