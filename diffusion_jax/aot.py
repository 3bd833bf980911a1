r"""Compile a config's programs for a TPU topology on any machine, and report what the compiler says.

    python -m diffusion_jax.aot --config configs/cifar10.py --topology v5e:2x2 \
        --config.model.dtype=bfloat16 [--samplers ddim:50,ddpm:1000 --sample_batch 256 --json r.json]

Check that a config fits and what to expect before paying for the pod. The training step and the
samplers are built by the same code as ``train.py``'s (:func:`diffusion_jax.trainer.build_programs`:
model, optimiser, mesh, shardings, FSDP, donation), on the compile-only devices of a TPU topology
(``jax.experimental.topologies``; needs ``libtpu``, not a TPU) instead of ``jax.devices()``, and
compiled by the TPU compiler. Multi-host topologies (``v5e:4x4``: 4 hosts) work: nothing here asks
``jax.process_count()``; the mesh spans every chip of every host.

Per program it reports: compile time; memory per chip (arguments, outputs, temporaries) against the
chip's HBM; flops and bytes per chip from ``cost_analysis()``; the compiler's own time estimate
(``optimal_seconds``: an estimate, not a measurement); a roofline max(flops / peak, bytes /
bandwidth) to check it; images/s and FLOP utilisation derived from the estimate; and the
collectives in the program (count and bytes per kind).

Two corrections to the raw estimate: each ``ConcatBitcast`` custom call counts -1 s in it (a
"no estimate" sentinel), so those are added back; and a ``while`` loop's body is counted once, not
once per trip. A sampler's chain is one ``scan`` over its steps, so its estimate is split, in
proportion to the compiler's per-kernel cycle estimates (``estimated_cycles`` in the optimised
HLO), into the loop body, reported per step and multiplied by the number of steps, and the work
outside the loop (casting the weights to the compute dtype, the initial noise), counted once. The
split is approximate: for large programs those cycles track the estimate closely, but they charge
tiny kernels more than the estimate does.

``--breakdown N`` also prints where the time and the bytes go (:func:`kernels_of`): the share of
the estimated cycles and the bytes moved per kind of kernel (network forward and backward
convolutions and elementwise work, the optimiser and EMA, layout copies, collectives, copies
between HBM and on-chip memory) and the N most expensive kernels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import config_utils, sharding
from diffusion_jax.config_utils import Config


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (Cloud TPU documentation)."""

    name: str
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


GiB = 2**30
CHIPS = {  # keyed by jax.Device.device_kind
    "TPU v4": Chip("v4", 275e12, 32 * GiB, 1228e9),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GiB, 819e9),
    "TPU v5": Chip("v5p", 459e12, 95 * GiB, 2765e9),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GiB, 1640e9),
}
MEGACORE = ("v4", "v5p")  # two TensorCores per chip, one JAX device per chip (as on a real VM)


def topology_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology such as ``v5e:2x2``, ``v4:2x2x2`` or ``v5e:4x4``:
    one per chip, in process order. Raises a RuntimeError naming the fix when libtpu is missing."""
    from jax.experimental import topologies

    # Compiling takes no TPU, so several processes may do it at once (libtpu otherwise holds a
    # lock file for the process that owns the chips).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in MEGACORE else {}
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001  (libtpu missing, or an unknown topology name)
        raise RuntimeError(
            f"cannot describe the TPU topology {topology!r} ({type(e).__name__}: {e}). It needs "
            "libtpu for the installed jax (pip install -e '.[tpu]', or pip install libtpu) and a "
            "name like v5e:2x2, v5e:4x4, v4:2x2x1, v4:2x2x2, v5p:2x2x1 or v6e:2x2."
        ) from e
    return sorted(devices.devices, key=lambda d: (d.process_index, d.id))


def chip_of(device: jax.Device) -> Chip:
    """The :class:`Chip` figures for a TPU device (ValueError for an unknown kind)."""
    try:
        return CHIPS[device.device_kind]
    except KeyError:
        raise ValueError(
            f"no chip figures for device kind {device.device_kind!r}; known: {sorted(CHIPS)}."
        ) from None


# ----------------------------------------------------------------------------------------------
# Reading a compiled program.

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(
    r"^\s*(?:ROOT )?%?[\w.-]+ = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", re.M
)


def _arrays(shape_text: str) -> list[tuple[int, bool]]:
    """(bytes, placed on-chip) of each array in an HLO shape; a layout marked S(1) is on-chip."""
    return [
        (_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d), "S(1)" in layout)
        for dtype, dims, layout in _ARRAY.findall(shape_text)
    ]


def array_bytes(shape_text: str) -> list[int]:
    """Bytes of each array in an HLO shape such as ``(f32[128,3]{1,0}, bf16[64])``."""
    return [n for n, _ in _arrays(shape_text)]


# A computation's header, ``[ENTRY ]%name (params) -> result {``: (ENTRY or None, name).
_HEADER = re.compile(r"^(ENTRY )?%?([\w.-]+) \(.*\) -> .*\{$")
_ROOT = re.compile(r"^\s*ROOT %?[\w.-]+ = (.+?) [\w-]+\(")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an optimised HLO text (per chip).

    Bytes are those of the result: for the asynchronous ``*-start`` forms, whose result is a tuple
    (operands, results), the result half. The TPU compiler writes a reduce-scatter as a custom
    fusion named ``all-reduce-scatter*`` around an all-reduce and a dynamic slice: that counts as
    one reduce-scatter of the slice's bytes.
    """
    out: dict[str, dict[str, int]] = {}

    def add(kind: str, nbytes: int) -> None:
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes

    computation = ""
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            computation = header.group(2)
            continue
        if computation.startswith("all-reduce-scatter"):
            root = _ROOT.match(line)
            if root:
                add("reduce-scatter", sum(array_bytes(root.group(1))))
            continue
        op = _COLLECTIVE_OP.match(line)
        if op is None:
            continue
        shape, kind, start = op.groups()
        sizes = array_bytes(shape)
        if start and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2 :] if kind != "all-reduce" else sizes[: len(sizes) // 2]
        add(kind, sum(sizes))
    return out


def while_loops(hlo_text: str) -> int:
    """How many ``while`` loops an optimised HLO text runs (the cost analysis counts each body once)."""
    return len(re.findall(r" while\(", hlo_text))


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


@dataclasses.dataclass
class Report:
    """What the TPU compiler says about one program, per chip. Times are the compiler's estimate."""

    program: str
    topology: str
    chips: int
    hosts: int
    compiled: bool = False
    error: str = ""
    compile_seconds: float = 0.0
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    hbm_bytes: int = 0
    fits: bool = False
    flops: float = 0.0
    bytes_accessed: float = 0.0
    raw_optimal_seconds: float = 0.0
    concat_bitcasts: int = 0
    est_seconds: float = 0.0  # per call; for a sampler's chain, per step (its loop body)
    setup_seconds: float = 0.0  # a sampler's work outside its loop, once per call
    loop_bytes_share: float = 1.0  # of bytes_accessed, the share of a sampler's loop body
    roofline_seconds: float = 0.0
    bound: str = ""  # "compute" | "memory": which roofline term is larger
    images: int = 0  # examples per call, all chips
    steps: int = 1  # trips of the sampler's loop (1: no loop)
    nfe_per_step: int = 1
    total_seconds: float = 0.0  # setup_seconds + est_seconds * steps
    images_per_second: float = 0.0
    flop_utilisation: float = 0.0  # flops / (est_seconds * peak bf16 FLOP/s)
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    while_loops: int = 0
    traffic: dict[str, int] = dataclasses.field(default_factory=dict)  # bytes by kernel kind

    @property
    def memory_bytes(self) -> int:
        """Peak bytes a chip holds for the program: arguments + outputs - aliased + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def out_of_memory(self) -> bool:
        """The compiler refused the program for want of HBM (RESOURCE_EXHAUSTED)."""
        return "RESOURCE_EXHAUSTED" in self.error

    def advice(self) -> str:
        """Empty when the program fits (or failed for another reason); else what to change."""
        if self.fits or not (self.compiled or self.out_of_memory):
            return ""
        return (
            f"{self.program} does not fit: {self.memory_bytes / GiB:.2f} GiB per chip > "
            f"{self.hbm_bytes / GiB:.2f} GiB HBM. Reduce train.batch_size (or use "
            "optim.grad_accum_steps), set model.remat=True, or shard parameters with "
            "sharding.fsdp_min_size (e.g. 65536)."
        )


def analyse(
    compiled: Any,
    program: str,
    topology: str,
    devices: Sequence[jax.Device],
    *,
    images: int,
    steps: int = 1,
    nfe_per_step: int = 1,
    breakdown: int = 0,
) -> Report:
    """A :class:`Report` from a compiled program for ``devices`` (one per chip); with ``breakdown``
    it also prints :func:`traffic_table` of its kernels with that many of the most expensive."""
    chip = chip_of(devices[0])
    report = Report(program, topology, len(devices), len({d.process_index for d in devices}))
    report.compiled, report.hbm_bytes = True, chip.hbm_bytes
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.fits = report.memory_bytes <= chip.hbm_bytes
    cost = _cost(compiled)
    text = compiled.as_text()
    report.flops = float(cost.get("flops", 0.0))
    report.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    report.raw_optimal_seconds = float(cost.get("optimal_seconds", 0.0))
    report.concat_bitcasts = len(re.findall(r'custom_call_target="ConcatBitcast"', text))
    est = report.raw_optimal_seconds + report.concat_bitcasts
    kernels = kernels_of(text)
    share = loop_share(kernels) if steps > 1 else 1.0
    report.est_seconds, report.setup_seconds = est * share, est * (1.0 - share)
    if share < 1.0:  # the byte count's share of the loop body, from the per-kernel count
        moved = sum(k.bytes for k in kernels) or 1
        report.loop_bytes_share = sum(k.bytes for k in kernels if k.in_loop) / moved
    compute = report.flops / chip.bf16_flops
    memory = report.bytes_accessed * report.loop_bytes_share / chip.hbm_bandwidth
    report.roofline_seconds = max(compute, memory)
    report.bound = "compute" if compute >= memory else "memory"
    report.images, report.steps, report.nfe_per_step = images, steps, nfe_per_step
    report.total_seconds = report.setup_seconds + report.est_seconds * steps
    if report.est_seconds > 0:
        report.images_per_second = images / report.total_seconds
        report.flop_utilisation = report.flops / (report.est_seconds * chip.bf16_flops)
    report.collectives = collectives(text)
    report.while_loops = while_loops(text)
    for k in kernels:
        report.traffic[k.category] = report.traffic.get(k.category, 0) + k.bytes
    if breakdown:
        print(
            f"\n{program} on {topology}: where the time and the bytes go\n\n{traffic_table(kernels, breakdown)}\n"
        )
    return report


def compile_and_analyse(
    jitted: Any, args: Sequence[Any], program: str, topology: str, devices: Sequence[jax.Device],
    *, hlo_dir: str | None = None, **kwargs: Any,
) -> Report:  # fmt: skip
    """Lowers and compiles ``jitted(*args)`` (abstract args) and analyses it; a compile error
    becomes a report with ``compiled=False`` and the message. With ``hlo_dir`` the optimised HLO
    goes to ``<hlo_dir>/<topology>_<program>.txt``."""
    start = time.time()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # noqa: BLE001  (reported, not raised: the other programs still run)
        report = Report(program, topology, len(devices), len({d.process_index for d in devices}))
        report.error = f"{type(e).__name__}: {str(e)[:2000]}"
        report.compile_seconds = time.time() - start
        # "... HLO temporaries (46.53G) exceeds available HBM (15.75G)": the compiler's figures.
        sizes = re.findall(r"\(([\d.]+)G\)", report.error)
        if report.out_of_memory and len(sizes) >= 2:
            report.temp_bytes, report.hbm_bytes = (int(float(x) * GiB) for x in sizes[:2])
        return report
    seconds = time.time() - start
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        name = f"{topology.replace(':', '_')}_{program}.txt"
        with open(os.path.join(hlo_dir, name), "w") as f:
            f.write(compiled.as_text())
    report = analyse(compiled, program, topology, devices, **kwargs)
    report.compile_seconds = seconds
    return report


# ----------------------------------------------------------------------------------------------
# Where the time and the bytes go: the kernels of an optimised TPU HLO text, one by one.

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*?) ([a-z][\w-]*)\((.*)$")
_NOT_KERNELS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
}  # fmt: skip
_NETWORK_FILES = ("/models/", "/ops/", "/flax/")
_UPDATE_FILES = ("train_state.py", "/optax/", "posthoc_ema.py")


@dataclasses.dataclass
class Kernel:
    """One top-level instruction (kernel) of a compiled program: what it is, the bytes it reads and
    writes, and the compiler's cycle estimate for it."""

    name: str
    opcode: str  # the HLO opcode; for a fusion, "fusion:<what it computes>"
    category: str
    bytes: int  # operands + result, wherever they live
    hbm_bytes: int  # of those, the arrays in HBM (not placed on-chip, S(1))
    op_name: str
    in_loop: bool  # inside a while loop's body (counted once, like the cost analysis)
    cycles: int  # the compiler's own estimate for it (``estimated_cycles``), 0 if it gives none


def _shape_bytes(shape_text: str) -> tuple[int, int]:
    """(all bytes, HBM bytes) of the arrays of an HLO shape."""
    arrays = _arrays(shape_text)
    return sum(n for n, _ in arrays), sum(n for n, on_chip in arrays if not on_chip)


def _call_args(rest: str) -> tuple[str, str]:
    """(text inside the instruction's outer parentheses, the attributes after them)."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i], rest[i + 1 :]
    return rest, ""


def _stack_files(hlo_text: str) -> dict[str, list[str]]:
    """stack_frame_id -> the file names of that frame and its callers, innermost first (from the
    FileNames, FileLocations and StackFrames tables at the top of an HLO text)."""
    tables: dict[str, dict[str, str]] = {"FileNames": {}, "FileLocations": {}, "StackFrames": {}}
    table = None
    for line in hlo_text.splitlines():
        if line in tables or line == "FunctionNames":
            table = tables.get(line)
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if m is None:
            if line.strip():
                table = None  # past the tables
            continue
        if table is not None:
            table[m.group(1)] = m.group(2)
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    location_file = {
        k: files.get(re.search(r"file_name_id=(\d+)", v).group(1), "")
        for k, v in tables["FileLocations"].items()
    }
    frames = {
        k: (
            location_file.get(re.search(r"file_location_id=(\d+)", v).group(1), ""),
            re.search(r"parent_frame_id=(\d+)", v).group(1),
        )
        for k, v in tables["StackFrames"].items()
    }
    out = {}
    for key in frames:
        chain, seen, k = [], set(), key
        while k in frames and k not in seen:
            seen.add(k)
            chain.append(frames[k][0])
            k = frames[k][1]
        out[key] = chain
    return out


def _category(opcode: str, op_name: str, files: list[str]) -> str:
    backward = "transpose(" in op_name
    if any(any(s in f for s in _UPDATE_FILES) for f in files[:3]) and not backward:
        return "optimiser, EMA, update"
    if opcode in ("copy-start", "slice-start", "copy-done", "slice-done"):
        return "async copies between HBM and on-chip memory"
    if opcode in ("copy", "transpose", "fusion:copy", "fusion:transpose"):
        return "layout copies"
    if any(opcode.split(":")[-1].startswith(c) for c in COLLECTIVES):
        return "collectives"
    net = any(any(s in f for s in _NETWORK_FILES) for f in files[:1]) or "UNet" in op_name
    where = "network" if net else "other"
    what = (
        "convolution/matmul" if "convolution" in opcode or "dot" in opcode else "elementwise/reduce"
    )
    return f"{where} {'backward' if backward else 'forward'}: {what}"


def kernels_of(hlo_text: str) -> list[Kernel]:
    """The kernels of an optimised HLO text (as ``compiled.as_text()`` prints it), each with its
    ``estimated_cycles`` and the bytes it reads and writes: operands plus result (of which those
    in HBM, not placed on-chip as S(1)); for an asynchronous copy, the slice it moves.

    A rough count (a kernel that reads part of an operand is charged all of it), meant for ranking
    where the time and traffic go, next to the cost analysis' own totals. Instructions of a
    ``while`` body are counted once. Categories come from the op's name (``transpose(`` = backward pass) and
    the source files of its stack frame (model code, the optimiser and EMA of ``train_state``).
    """
    shapes: dict[str, str] = {}
    bodies: dict[str, str] = {}  # computation -> what kind of top-level region ("entry", "loop")
    fused_ops: dict[str, set[str]] = {}
    computation, entries = "", []
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            computation = header.group(2)
            if header.group(1):
                bodies[computation] = "entry"
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[f"{computation}/{name}"] = shape
        fused_ops.setdefault(computation, set()).add(opcode)
        args, attrs = _call_args(rest)
        for key in ("body", "condition"):
            target = re.search(rf"\b{key}=%?([\w.-]+)", attrs)
            if target:
                bodies[target.group(1)] = "loop"
        for target in re.findall(
            r"(?:branch_computations=\{|true_computation=|false_computation=)%?([\w.-]+)", attrs
        ):
            bodies.setdefault(target, "entry")
        entries.append((computation, name, shape, opcode, args, attrs))
    files = _stack_files(hlo_text)
    kernels = []
    for computation, name, shape, opcode, args, attrs in entries:
        region = bodies.get(computation)
        if region is None or opcode in _NOT_KERNELS or opcode.endswith("-done"):
            continue
        if 'custom_call_target="ConcatBitcast"' in attrs:  # joins copied slices: no traffic
            continue
        kind = opcode
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.-]+)", attrs)
            ops = fused_ops.get(called.group(1), set()) if called else set()
            heavy = [
                o
                for o in ("convolution", "dot", "all-reduce", "reduce", "transpose", "copy")
                if o in ops
            ]
            kind = f"fusion:{heavy[0] if heavy else 'elementwise'}"
        if opcode in ("copy-start", "slice-start"):  # a DMA, (source, destination, context)
            arrays = _arrays(shape)
            moved = arrays[-2][0]  # the slice it moves, read on one side and written on the other
            in_hbm = sum(not on_chip for _, on_chip in arrays[:2])
            sizes = [(2 * moved, in_hbm * moved)]
        else:
            operands = re.findall(r"%([\w.-]+)", args)
            sizes = [_shape_bytes(shape)] + [
                _shape_bytes(shapes.get(f"{computation}/{o}", "")) for o in operands
            ]
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        op = op_name.group(1) if op_name else ""
        chain = files.get(frame.group(1), []) if frame else []
        nbytes, hbm = (sum(x) for x in zip(*sizes, strict=True))
        category = _category(kind, op, chain)
        cycles = re.search(r'"estimated_cycles":"(\d+)"', attrs)
        cycles = int(cycles.group(1)) if cycles else 0
        kernels.append(Kernel(name, kind, category, nbytes, hbm, op, region == "loop", cycles))
    return kernels


def loop_share(kernels: Sequence[Kernel]) -> float:
    """The share of the compiler's estimated cycles spent in ``while`` bodies (1.0 without any).

    A sampler's chain is one loop; what lies outside it (casting the weights to the compute dtype,
    the initial noise, the output) runs once per call, not once per step.
    """
    total = sum(k.cycles for k in kernels)
    if not total or not any(k.in_loop for k in kernels):
        return 1.0
    return sum(k.cycles for k in kernels if k.in_loop) / total


def traffic_table(kernels: Sequence[Kernel], top: int = 15) -> str:
    """Markdown: bytes moved and the compiler's estimated time by kind of kernel, then the ``top``
    kernels by estimated time. Time shares come from each kernel's ``estimated_cycles``."""
    total_bytes = sum(k.bytes for k in kernels) or 1
    total_cycles = sum(k.cycles for k in kernels) or 1
    by_kind: dict[str, list[int]] = {}
    for k in kernels:
        entry = by_kind.setdefault(k.category, [0, 0, 0, 0])
        entry[0] += k.cycles
        entry[1] += k.bytes
        entry[2] += k.hbm_bytes
        entry[3] += 1
    rows = [
        "| kernels of this kind | count | share of the estimated time | GB moved | of which HBM |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, (cycles, nbytes, hbm, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        rows.append(
            f"| {kind} | {count} | {cycles / total_cycles:.1%} | {nbytes / 1e9:.3f} | "
            f"{hbm / 1e9:.3f} |"
        )
    hbm = sum(k.hbm_bytes for k in kernels)
    rows.append(f"| total | {len(kernels)} | 100% | {total_bytes / 1e9:.3f} | {hbm / 1e9:.3f} |")
    if top:
        rows += [
            "",
            "| kernel | what | share of the time | GB moved | op |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k in sorted(kernels, key=lambda k: (-k.cycles, -k.bytes))[:top]:
            loop = " (loop)" if k.in_loop else ""
            rows.append(
                f"| {k.name}{loop} | {k.opcode} | {k.cycles / total_cycles:.1%} | "
                f"{k.bytes / 1e9:.3f} | {k.op_name[-90:]} |"
            )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# The programs of a config.


def data_shape_of(config: Config) -> tuple[int, ...]:
    """One example's shape from the data config alone (no data is read): (H, W, C) or (2,)."""
    from diffusion_jax.data import config as data_config

    d = config.data
    if d.source in data_config.POINT_SOURCES:
        return (2,)
    if d.image_size > 0 and d.channels > 0:
        return (d.image_size, d.image_size, d.channels)
    raise ValueError(
        f"data.image_size={d.image_size} and data.channels={d.channels}: the compile-only mode "
        "needs both set (> 0) to know the image shape without reading the data."
    )


def parse_samplers(spec: str) -> list[tuple[str, int | None]]:
    """``"ddim:50,ddpm:1000"`` -> [("ddim", 50), ("ddpm", 1000)]; ``ddpm`` alone: all T steps."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = item.partition(":")
        out.append((name, int(steps) if steps else None))
    return out


def _nfe_per_step(sampler: str) -> int:
    return 2 if sampler == "heun" else 1


def compile_programs(
    config: Any,
    topology: str,
    *,
    samplers: Sequence[tuple[str, int | None]] = (),
    sample_batch: int = 256,
    forward: bool = True,
    train: bool = True,
    hlo_dir: str | None = None,
    breakdown: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> list[Report]:
    """Compiles ``config``'s training step (unless ``train=False``), a bare forward (``forward``) and
    each sampler of ``samplers`` for ``sample_batch`` images, for ``topology`` as ``train.py``
    builds them. Returns one report each."""
    from diffusion_jax import trainer

    cfg = config if isinstance(config, Config) else config_utils.parse_config(config)
    if cfg.latent is not None:
        raise ValueError(
            "compile-only checks of latent diffusion runs are not supported yet (the step also "
            "takes the autoencoder's parameters); check the same model without the latent section."
        )
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(devices)
    hosts = len({d.process_index for d in devices})
    sharding.check_batch_size(cfg.train.batch_size, mesh, process_count=hosts)
    data_shape = data_shape_of(cfg)
    programs = trainer.build_programs(cfg, mesh, data_shape)
    batch = cfg.train.batch_size
    common = dict(topology=topology, devices=devices, hlo_dir=hlo_dir, breakdown=breakdown)

    reports = []
    if train:
        log(f"compiling the training step (global batch {batch}) for {topology}")
        args = programs.abstract_train_args(mesh, batch, data_shape)
        reports.append(
            compile_and_analyse(programs.train_step, args, "train_step", images=batch, **common)
        )
    ema = programs.abstract_state_args().ema_params
    if forward:
        log(f"compiling a bare forward pass (batch {sample_batch})")
        reports.append(
            compile_and_analyse(
                _forward_fn(programs.model, cfg, data_shape, mesh, sample_batch),
                (ema,),
                f"forward_b{sample_batch}",
                images=sample_batch,
                **common,
            )  # fmt: skip
        )
    for name, steps in samplers:
        total = steps or cfg.diffusion.num_timesteps
        log(f"compiling the {name} sampler, {total} steps, batch {sample_batch}")
        grid = trainer.make_sample_grid_fn(
            programs.model, cfg, data_shape, mesh, sample_batch, sampler=name, num_steps=steps
        )
        reports.append(
            compile_and_analyse(
                grid,
                (ema,),
                f"sample_{name}{total}_b{sample_batch}",
                images=sample_batch,
                steps=total,
                nfe_per_step=_nfe_per_step(name),
                **common,
            )  # fmt: skip
        )
    return reports


def _forward_fn(model, cfg: Config, data_shape, mesh, batch: int):
    """Jitted ``forward(params) -> [batch, *data_shape]``: one denoiser evaluation, the batch split."""
    denoise = config_utils.denoise_fn_for(model)
    split = sharding.batch_sharding(mesh) if batch % mesh.devices.size == 0 else None
    num_classes = cfg.model.num_classes

    def forward(params):
        x = jnp.zeros((batch, *data_shape), jnp.float32)
        if split is not None:
            x = jax.lax.with_sharding_constraint(x, split)
        t = jnp.full((batch,), 1, jnp.int32)
        y = None if num_classes is None else jnp.zeros((batch,), jnp.int32)
        return denoise(params, x, t, y)

    return jax.jit(forward, out_shardings=split or sharding.replicated(mesh))


# ----------------------------------------------------------------------------------------------
# Output.


def _collective_text(c: dict[str, dict[str, int]]) -> str:
    if not c:
        return "none"
    return ", ".join(f"{k} {v['count']}x {v['bytes'] / 2**20:.1f}MiB" for k, v in sorted(c.items()))


def table(reports: Sequence[Report]) -> str:
    """A Markdown table of reports (per chip; 'est.' is the compiler's estimate). A sampler's
    figures are per step (``x steps``), its estimate followed by the once-per-call work (``+``)."""
    head = (
        "| program | topology | compiled (s) | memory/chip (HBM) | GFLOP/chip | GB/chip | est. ms "
        "| roofline ms | bound | est. images/s | est. FLOP util. | collectives |"
    )
    rows = [head, "|" + " --- |" * 12]
    for r in reports:
        if r.out_of_memory:
            rows.append(
                f"| {r.program} | {r.topology} | out of HBM ({r.compile_seconds:.0f}) | "
                f"{r.memory_bytes / GiB:.2f} GiB ({r.hbm_bytes / GiB:.2f}) **does not fit** "
                "| | | | | | | | |"
            )
            continue
        if not r.compiled:
            rows.append(
                f"| {r.program} | {r.topology} | failed ({r.compile_seconds:.0f}) | "
                f"{r.error[:120]} | | | | | | | | |"
            )
            continue
        per = f" x{r.steps}" if r.steps > 1 else ""
        setup = f" + {r.setup_seconds * 1e3:.2f}" if r.steps > 1 else ""
        fit = "" if r.fits else " **does not fit**"
        rows.append(
            f"| {r.program} | {r.topology} ({r.chips} chips, {r.hosts} host(s)) | "
            f"{r.compile_seconds:.0f} | {r.memory_bytes / GiB:.2f} GiB ({r.hbm_bytes / GiB:.0f}){fit} | "
            f"{r.flops / 1e9:.1f}{per} | {r.bytes_accessed * r.loop_bytes_share / 1e9:.2f}{per} | "
            f"{r.est_seconds * 1e3:.2f}{per}{setup} | {r.roofline_seconds * 1e3:.2f}{per} | {r.bound} | "
            f"{r.images_per_second:,.0f} | {r.flop_utilisation:.0%} | {_collective_text(r.collectives)} |"
        )
    return "\n".join(rows)


def run(
    config: Any,
    topologies: Sequence[str],
    *,
    samplers: str = "",
    sample_batch: int = 256,
    json_path: str | None = None,
    hlo_dir: str | None = None,
    breakdown: int = 0,
) -> int:
    """Compiles and prints the table (and writes JSON); exit code 0 if every program compiled and fits."""
    reports: list[Report] = []
    for topology in topologies:
        try:
            reports += compile_programs(
                config, topology, samplers=parse_samplers(samplers), sample_batch=sample_batch,
                hlo_dir=hlo_dir, breakdown=breakdown,
                log=lambda s: print(s, file=sys.stderr, flush=True),
            )  # fmt: skip
        except (RuntimeError, ValueError) as e:  # no libtpu, bad topology, bad config
            print(f"diffusion_jax.aot: {e}", file=sys.stderr)
            return 2
    print(table(reports))
    for r in reports:
        if r.advice():
            print(r.advice())
    if json_path:
        with open(json_path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    return 0 if all(r.compiled and r.fits for r in reports) else 1


def _main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config file (configs/*.py).", lock_config=True
    )
    flags.DEFINE_multi_string(
        "topology", ["v5e:2x2"], "TPU topology, e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v4:2x2x2, "
        "v5p:2x2x1, v6e:2x2 (repeat the flag for several).",
    )  # fmt: skip
    flags.DEFINE_string(
        "samplers", "", "Samplers to compile, e.g. 'ddim:50,ddpm:1000' (ddpm alone: all T steps)."
    )
    flags.DEFINE_integer("sample_batch", 256, "Images per sampler call (and the bare forward).")
    flags.DEFINE_string("json", None, "Also write the reports here, as JSON.")
    flags.DEFINE_string("hlo_dir", None, "Write each program's optimised TPU HLO text here.")
    flags.DEFINE_integer(
        "breakdown",
        0,
        "Also print where each program's time and bytes go, with this many most expensive kernels.",
    )
    flags.mark_flags_as_required(["config"])
    FLAGS = flags.FLAGS

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        sys.exit(
            run(
                FLAGS.config,
                FLAGS.topology,
                samplers=FLAGS.samplers,
                sample_batch=FLAGS.sample_batch,
                json_path=FLAGS.json,
                hlo_dir=FLAGS.hlo_dir,
                breakdown=FLAGS.breakdown,
            )  # fmt: skip
        )

    app.run(main)


if __name__ == "__main__":
    _main()
