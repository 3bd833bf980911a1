"""diffusion_jax.aot: train.py's programs compiled for TPU topologies on this CPU-only machine.

The TPU compiler comes with libtpu (installed by the test extra); where it cannot describe a
topology for the installed jax the tests skip, saying why. Tiny config, to keep compiles short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import aot, config_utils, sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _topology_or_skip(name: str) -> list[jax.Device]:
    try:
        return aot.topology_devices(name)
    except RuntimeError as e:
        pytest.skip(f"no TPU compiler for this jax: {e}")


def _config(**overrides):
    config = tiny.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config_utils.parse_config(config)


def _param_bytes(cfg) -> int:
    model = config_utils.build_model(cfg)
    shape = aot.data_shape_of(cfg)
    params = jax.eval_shape(lambda: config_utils.init_params(model, cfg, shape, jax.random.key(0)))
    return sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))


def _cpu_flops_per_example(cfg) -> float:
    """The same training step compiled for one CPU device: flops / example."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    shape = aot.data_shape_of(cfg)
    programs = trainer.build_programs(cfg, mesh, shape)
    args = programs.abstract_train_args(mesh, cfg.train.batch_size, shape)
    cost = programs.train_step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) / cfg.train.batch_size


def test_parses_collectives_and_shapes_from_hlo_text():
    hlo = "\n".join(
        [
            "  %all-reduce.1 = (f32[32]{0:T(128)}, bf16[3,3,4,8]{3,2,1,0}) all-reduce(%a, %b), "
            "replica_groups={{0,1,2,3}}",
            "  %ag = (f32[8,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%p), dimensions={0}",
            "  ROOT %rs.2 = f32[4,16]{1,0} reduce-scatter(%g), dimensions={0}",
            "  %x = f32[4] add(%y, %z)",
            "}",
            "",
            "%all-reduce-scatter.3 (input_0: f32[64,16]) -> f32[16,16] {",  # TPU's reduce-scatter
            "  %input_0 = f32[64,16]{1,0} parameter(0)",
            "  %all-reduce.9 = f32[64,16]{1,0} all-reduce(%input_0), to_apply=%add",
            "  ROOT %ds.2 = f32[16,16]{1,0:T(8,128)} dynamic-slice(%all-reduce.9, %c, %c)",
            "}",
        ]
    )
    assert aot.array_bytes("(f32[32]{0}, bf16[3,3,4,8]{3,2,1,0}, s32[])") == [128, 576, 4]
    assert aot.collectives(hlo) == {
        "all-reduce": {"count": 1, "bytes": 128 + 576},
        "all-gather": {"count": 1, "bytes": 32 * 16 * 4},  # the result half of the start tuple
        "reduce-scatter": {"count": 2, "bytes": 4 * 16 * 4 + 16 * 16 * 4},
    }
    assert aot.parse_samplers("ddim:50, ddpm") == [("ddim", 50), ("ddpm", None)]


HLO_WITH_A_LOOP = """\
FileNames
1 "/src/diffusion_jax/models/unet.py"
2 "/src/diffusion_jax/train_state.py"

FileLocations
1 {file_name_id=1 function_name_id=1 line=3 end_line=3 column=1 end_column=2}
2 {file_name_id=2 function_name_id=1 line=9 end_line=9 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}


%fused_computation.1 (param_0: bf16[8,128]) -> bf16[8,128] {
  %param_0 = bf16[8,128]{1,0} parameter(0)
  ROOT %convolution.1 = bf16[8,128]{1,0} convolution(%param_0, %param_0), dim_labels=bf_io->bf
}

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]{1,0}) parameter(0)
  %x = bf16[8,128]{1,0} get-tuple-element(%p), index=1
  %f = bf16[8,128]{1,0} fusion(%x), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(s)/while/body/UNet/conv" stack_frame_id=1}, backend_config={"estimated_cycles":"300"}
  %c = bf16[8,128]{1,0:T(8,128)S(1)} copy(%f), backend_config={"estimated_cycles":"0"}
  ROOT %t = (s32[], bf16[8,128]{1,0}) tuple(%i, %c)
}

ENTRY %main (a: f32[8,128], w: f32[128,128]) -> f32[128,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %w = f32[128,128]{1,0} parameter(1)
  %u = f32[128,128]{1,0} add(%w, %w), metadata={op_name="jit(s)/add" stack_frame_id=2}, backend_config={"estimated_cycles":"100"}
  %l = (s32[], bf16[8,128]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %g = f32[128,128]{1,0} all-reduce(%u), to_apply=%add
}
"""


def test_kernels_of_counts_each_kernel_and_splits_off_the_loop():
    kernels = {k.name: k for k in aot.kernels_of(HLO_WITH_A_LOOP)}
    assert set(kernels) == {"f", "c", "u", "g"}  # parameters, tuples and the while itself are not
    f, c, u, g = (kernels[n] for n in "fcug")
    assert f.in_loop and c.in_loop and not u.in_loop and not g.in_loop
    assert f.bytes == f.hbm_bytes == 2 * 8 * 128 * 2  # reads x, writes its result
    assert f.opcode == "fusion:convolution" and f.category == "network forward: convolution/matmul"
    assert c.bytes == 2 * 8 * 128 * 2 and c.hbm_bytes == 8 * 128 * 2  # its result is on-chip
    assert c.category == "layout copies"
    assert u.bytes == 3 * 128 * 128 * 4 and u.category == "optimiser, EMA, update"
    assert g.category == "collectives"
    assert aot.loop_share(list(kernels.values())) == pytest.approx(300 / 400)
    text = aot.traffic_table(list(kernels.values()), top=2)
    assert "| optimiser, EMA, update | 1 | 25.0% | 0.000 | 0.000 |" in text  # 100 of 400 cycles
    assert "| f (loop) | fusion:convolution | 75.0% |" in text and "| u | add | 25.0% |" in text


def test_unknown_topology_names_the_fix():
    _topology_or_skip("v5e:2x2")
    with pytest.raises(RuntimeError, match="v5e:2x2"):
        aot.topology_devices("v5e:3x7x9")


def test_train_step_and_sampler_compile_for_four_tpu_chips():
    """One host, four v5e chips: the data-parallel step fits, has exactly one gradient all-reduce
    (of the parameters, plus the loss), and its flops per example agree with the CPU compiler's
    count of the same program; the 5-step DDIM chain compiles as one program without collectives."""
    devices = _topology_or_skip("v5e:2x2")
    assert len(devices) == 4 and aot.chip_of(devices[0]).name == "v5e"
    cfg = _config(**{"train.batch_size": 16})
    reports = aot.compile_programs(cfg, "v5e:2x2", samplers=[("ddim", 5)], sample_batch=8)
    by_name = {r.program: r for r in reports}
    assert set(by_name) == {"train_step", "forward_b8", "sample_ddim5_b8"}, by_name
    for r in reports:
        assert r.compiled, r.error
        assert r.fits and 0 < r.memory_bytes < r.hbm_bytes
        assert r.flops > 0 and r.bytes_accessed > 0 and r.est_seconds > 0
        # The compiler's estimate of the whole program within a factor of 3 of the roofline from
        # its own counts (a sampler's chain counts its loop body once in both).
        chip = aot.chip_of(devices[0])
        roofline = max(r.flops / chip.bf16_flops, r.bytes_accessed / chip.hbm_bandwidth)
        assert roofline / 3 < r.est_seconds + r.setup_seconds < 3 * roofline, r

    step = by_name["train_step"]
    assert set(step.collectives) == {"all-reduce"}, step.collectives
    assert step.collectives["all-reduce"]["count"] == 1
    params = _param_bytes(cfg)
    # The gradients (float32, like the parameters) and the loss; the label embedding's gradient
    # may travel in a smaller, gathered form, hence the 1% below.
    assert 0.99 * params <= step.collectives["all-reduce"]["bytes"] <= params + 4096

    # Per-example flops: TPU (per chip x chips / batch) against CPU (one device / batch). The two
    # compilers count the same convolutions and matmuls (which dominate) but fuse and count
    # elementwise work differently: 15% covers that (measured difference: see the note below).
    tpu = step.flops * step.chips / cfg.train.batch_size
    cpu = _cpu_flops_per_example(cfg)
    assert tpu == pytest.approx(cpu, rel=0.15), (tpu, cpu)

    forward = by_name["forward_b8"]
    chain = by_name["sample_ddim5_b8"]
    assert chain.steps == 5 and chain.while_loops == 1
    # The estimate splits into the loop body (per step) and the once-per-call rest (casting the
    # weights to the compute dtype, the initial noise), both positive, summing to the whole.
    assert chain.est_seconds > 0 and chain.setup_seconds > 0
    whole = chain.est_seconds + chain.setup_seconds
    assert whole == pytest.approx(chain.raw_optimal_seconds + chain.concat_bitcasts)
    assert chain.total_seconds == pytest.approx(chain.setup_seconds + 5 * chain.est_seconds)
    assert 0 < chain.loop_bytes_share < 1
    # A step of the chain costs about one network evaluation: no more than a bare forward, which
    # also casts the weights (+10% for the sampler's own elementwise work).
    assert chain.est_seconds < 1.1 * forward.est_seconds, (chain, forward)
    assert chain.collectives == {}, chain.collectives
    # Where the bytes go: the training step has a backward pass and an optimiser, the forward not.
    assert any(k.startswith("network backward") for k in step.traffic), step.traffic
    assert step.traffic.get("optimiser, EMA, update", 0) > 0, step.traffic
    assert not any("backward" in k for k in forward.traffic), forward.traffic
    # A rough count (operands + results of each kernel) next to the cost analysis' own total.
    assert step.bytes_accessed / 3 < sum(step.traffic.values()) < 3 * step.bytes_accessed
    # One network evaluation per step: the chain's per-step flops are the forward's, within the
    # sampler's own elementwise arithmetic.
    assert chain.flops == pytest.approx(forward.flops, rel=0.1)


def test_multi_host_topology_data_parallel_and_fsdp(tmp_path):
    """v5e:2x4 is two hosts of four chips: the CLI compiles the step on all 8; data parallel has
    one all-reduce; FSDP swaps the large arrays' all-reduce for reduce-scatter + all-gather."""
    devices = _topology_or_skip("v5e:2x4")
    assert len(devices) == 8 and len({d.process_index for d in devices}) == 2
    out = tmp_path / "report.json"
    args = ["--config", "configs/tiny.py", "--topology", "v5e:2x4", "--json", str(out)]
    args += ["--config.train.batch_size=32", "--config.sample.num_samples=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.aot", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| train_step | v5e:2x4 (8 chips, 2 host(s))" in proc.stdout
    (dp,) = [r for r in json.loads(out.read_text()) if r["program"] == "train_step"]
    assert dp["hosts"] == 2 and dp["chips"] == 8 and dp["fits"]
    assert (
        set(dp["collectives"]) == {"all-reduce"} and dp["collectives"]["all-reduce"]["count"] == 1
    )

    cfg = _config(**{"train.batch_size": 32, "sharding.fsdp_min_size": 4096})
    (fsdp,) = aot.compile_programs(cfg, "v5e:2x4", forward=False)
    assert fsdp.compiled and fsdp.fits, fsdp.error
    kinds = fsdp.collectives
    assert kinds.get("reduce-scatter", {}).get("count", 0) >= 1, kinds
    assert kinds.get("all-gather", {}).get("count", 0) >= 1, kinds
    # Most gradient bytes are reduce-scattered (each chip receives its 8th); what is still
    # all-reduced is the arrays below the FSDP threshold and a few the compiler chose to (about a
    # quarter of the bytes for this tiny net; see benchmarks/README.md for the CIFAR-10 one).
    params = _param_bytes(cfg)
    assert kinds["reduce-scatter"]["bytes"] * fsdp.chips > 0.5 * params, kinds
    assert kinds.get("all-reduce", {"bytes": 0})["bytes"] < 0.35 * params, kinds
    assert "all-to-all" not in kinds, kinds
    # Each chip holds an 8th of the large arrays: the state (params, EMA, Adam) shrinks.
    assert fsdp.argument_bytes < 0.5 * dp["argument_bytes"]


def test_a_program_that_does_not_fit_says_what_to_change():
    _topology_or_skip("v5e:2x2")
    cfg = _config(**{"train.batch_size": 2**20, "sample.num_samples": 0})
    (step,) = aot.compile_programs(cfg, "v5e:2x2", forward=False)
    # The TPU compiler refuses it (RESOURCE_EXHAUSTED) and says how much it would need.
    assert step.out_of_memory and not step.fits, step.error
    assert step.memory_bytes > step.hbm_bytes > 10 * 2**30
    assert "does not fit" in aot.table([step])
    advice = step.advice()
    assert "does not fit" in advice and "batch_size" in advice and "remat" in advice
    assert "fsdp_min_size" in advice
