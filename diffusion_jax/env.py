"""Environment check: ``python -m diffusion_jax.env [--batch_size N] [--json]``.

Prints the JAX version, backend, devices per host, process count, and warnings about common
misconfigurations (a TPU VM where only one worker joined, a batch that does not divide the devices,
a GPU box where JAX sees only the CPU). Exits 0 whatever it finds; it reports, it does not fix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import jax


@dataclass
class EnvReport:
    """What this process sees: versions, devices and any warnings."""

    jax_version: str
    jaxlib_version: str
    backend: str
    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    device_kinds: list[str]
    warnings: list[str] = field(default_factory=list)


def check_environment(batch_size: int | None = None) -> EnvReport:
    """Inspects the JAX runtime; ``batch_size`` (global) is checked against the device count."""
    import jaxlib

    devices = jax.devices()
    local = jax.local_devices()
    report = EnvReport(
        jax_version=jax.__version__,
        jaxlib_version=getattr(jaxlib, "__version__", "unknown"),
        backend=jax.default_backend(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=len(local),
        global_device_count=len(devices),
        device_kinds=sorted({d.device_kind for d in devices}),
    )
    report.warnings.extend(_warnings(report, batch_size))
    return report


CPU_MALLOC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
)


def cpu_malloc_hint(backend: str | None = None) -> str | None:
    """On a Linux CPU backend without :data:`CPU_MALLOC_TUNABLES`, the line that says to set them.

    XLA allocates each run's temporaries on a worker thread, whose glibc arena hands large blocks
    back to the kernel on free, so every training step page-faults its temporaries in afresh; with
    one arena, no mmap and no trimming they are reused. Issue 7 measured the CIFAR-10 U-Net's
    batch-32 training step (2-core CPU) at 7.4-7.6 s without and 6.6-6.8 s with them in a bare
    process, and 12.3-13.4 s against 8.1-8.3 s in a process holding other compiled programs.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or not sys.platform.startswith("linux"):
        return None
    have = os.environ.get("GLIBC_TUNABLES", "")
    if all(t in have for t in CPU_MALLOC_TUNABLES.split(":")):
        return None
    return (
        "JAX runs on the CPU without the malloc settings that make its steps faster "
        f"(10-40% on large batches): start the process with GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}"
    )


CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions on which CPU_XLA_FLAGS was measured: XLA aborts the process on a flag it does not
# know, and experimental flags come and go, so it is only ever suggested, and only for these.
CPU_XLA_FLAGS_JAXLIB = ("0.10.",)


def cpu_xla_flags_hint(backend: str | None = None) -> str | None:
    """On a CPU backend of a verified jaxlib without :data:`CPU_XLA_FLAGS`, the line to set them.

    The flag sends convolutions to XLA's Eigen kernels instead of YNNPACK's (matmuls stay with
    YNNPACK; :func:`ynn_fused_convolutions` counts what is left there), where XLA's kernel gradient
    ran 1.2-1.8x faster than a hand-written one of matmuls per kernel tap. Issue 7 measured the CIFAR-10 U-Net's batch-32 training step on a 2-core AVX-512 CPU at 5.8-8.3 s with
    it against 7.5-9.9 s without (15-25%); forward 1.68-1.80 against 1.76-1.86 s.
    """
    import jaxlib

    backend = backend or jax.default_backend()
    version = getattr(jaxlib, "__version__", "")
    if backend != "cpu" or not version.startswith(CPU_XLA_FLAGS_JAXLIB):
        return None
    if CPU_XLA_FLAGS.split("=")[0] in os.environ.get("XLA_FLAGS", ""):
        return None  # set, to this or another value: the user's choice stands
    return (
        "JAX runs on the CPU without the XLA flag that makes convolutions faster (15-25%): "
        f'start the process with XLA_FLAGS="{CPU_XLA_FLAGS}"'
    )


def ynn_fused_convolutions(hlo: str) -> int:
    """How many convolutions of an optimised CPU HLO text (``compiled.as_text()``) sit inside
    YNNPACK fusions: 0 for a program compiled with :data:`CPU_XLA_FLAGS`."""
    bodies = dict(re.findall(r"^%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
    called = re.findall(r"ynn_fusion[.0-9]* = .*?calls=%?([\w.-]+)", hlo)
    return sum(" convolution(" in bodies.get(c, "") for c in called)


def _warnings(report: EnvReport, batch_size: int | None) -> list[str]:
    out = []
    for hint in (cpu_malloc_hint(report.backend), cpu_xla_flags_hint(report.backend)):
        if hint:
            out.append(hint + ".")
    if batch_size is not None and batch_size % report.global_device_count:
        out.append(
            f"batch size {batch_size} does not divide the {report.global_device_count} devices: "
            f"use a multiple of {report.global_device_count} (e.g. "
            f"{(batch_size // report.global_device_count + 1) * report.global_device_count})."
        )
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    expected_workers = len([h for h in tpu_workers.split(",") if h]) if tpu_workers else 0
    if report.backend == "tpu" and expected_workers > report.process_count:
        out.append(
            f"this TPU slice has {expected_workers} workers but only {report.process_count} JAX "
            "process(es) joined: run the same command on every worker "
            "(gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...)."
        )
    if report.backend == "cpu" and os.path.exists("/dev/nvidia0"):
        out.append(
            "an NVIDIA GPU is present but JAX runs on the CPU: install the CUDA build "
            '(pip install -e ".[cuda12]") and check that no JAX_PLATFORMS=cpu is set.'
        )
    if report.backend == "cpu" and os.path.exists("/dev/accel0"):
        out.append(
            'a TPU is present but JAX runs on the CPU: install the TPU build (pip install -e ".[tpu]").'
        )
    if (
        report.process_count > 1
        and report.local_device_count * report.process_count != report.global_device_count
    ):
        out.append(
            f"uneven hosts: {report.local_device_count} local devices x {report.process_count} processes "
            f"!= {report.global_device_count} devices in all."
        )
    return out


def format_report(report: EnvReport) -> str:
    """The report as the few lines the command prints."""
    lines = [
        f"jax {report.jax_version} (jaxlib {report.jaxlib_version}), backend: {report.backend}",
        f"process {report.process_index} of {report.process_count}; "
        f"{report.local_device_count} local device(s), {report.global_device_count} in all: "
        + ", ".join(report.device_kinds),
    ]
    lines += [f"WARNING: {w}" for w in report.warnings] or ["no problems found"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.env", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch_size", type=int, default=None, help="global batch size to check")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join the multi-process run first, as train.py does (pod slices, Slurm, JAX_* variables)",
    )
    args = parser.parse_args(argv)
    if args.distributed:
        from diffusion_jax import sharding

        sharding.initialize_distributed()
    report = check_environment(args.batch_size)
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
