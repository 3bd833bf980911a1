"""Every script in benchmarks/ runs end to end at a tiny size (benchmarks are not run by CI otherwise).

The diffusers comparison runs its PyTorch half only where torch and diffusers are installed (the
``bench`` extra); the JAX half always runs, so a broken benchmark fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {f for f in os.listdir(BENCH) if f.endswith(".py")}
    assert scripts == set(SMOKE), f"add a tiny-size run for {scripts ^ set(SMOKE)} below"


def _unet_vs_diffusers(tmp_path):
    out = tmp_path / "report.json"
    stdout = _run("unet_vs_diffusers.py", "--quick", "--tiny", "--out", str(out))
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert set(cases) == {"forward_b1", "train_b1", "chain2_b1"}
    assert all(c["ours"]["median"] > 0 for c in cases.values())
    assert report["setup"]["train"]["1"]["ours"]["flops"] > 0
    assert report["matmul_peak_flops"] > 0
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        assert "theirs" not in report["num_params"]
    else:
        assert report["num_params"]["theirs"] == report["num_params"]["ours"]
        assert all(c["ratio"]["median"] > 0 for c in cases.values())
    assert "train_b1" in stdout


def _sampler_compile(tmp_path):
    stdout = _run("sampler_compile.py", "--tiny")
    assert "ddim" in stdout


def _input_pipeline(tmp_path):
    stdout = _run("input_pipeline.py", "--num-images", "8", "--batches", "1", "--batch-size", "4")
    assert "images/s" in stdout or stdout.strip()


def _quality(tmp_path):
    stdout = _run("quality.py", "--tiny", "--workdir", str(tmp_path / "quality"))
    assert "| ddim | 2 |" in stdout


def _conv_kernels(tmp_path):
    out = tmp_path / "conv.json"
    stdout = _run("conv_kernels.py", "--tiny", "--reps", "1", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    # The tiny net's convolutions, found by the interceptor: its input conv first, a strided
    # (downsampling) one with asymmetric padding, and one call per conv of the forward pass.
    assert rows[0]["first"] and rows[0]["shape"].startswith("8x8 3->32 k3s1")
    assert any("s2p01x01" in r["shape"] for r in rows)
    # conv_in + down (2 per res block, 1 downsample) + mid (2 x 2) + up (2 x 2 per level, 1
    # upsample) + conv_out, for ch_mult (1, 2) and one res block per level: 1+3+2+4+5+4+1.
    assert sum(r["count"] for r in rows) == 20
    assert all(r["ours_forward"] > 0 and r["ours_train"] > 0 for r in rows)
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "theirs_forward" not in rows[0]
    else:
        assert all(r["theirs_forward"] > 0 and r["theirs_train"] > 0 for r in rows)
    assert "all convolutions, one train" in stdout


def _step_variants(tmp_path):
    out = tmp_path / "variants.json"
    _run(
        "step_variants.py", "--tiny", "--rounds", "2", "--variant", "base",
        "--variant", "taps:taps=1,dense=1,xla_cpu_enable_concurrency_optimized_scheduler=false",
        "--out", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    base, taps = report["variants"]["base"], report["variants"]["taps"]
    assert report["base"] == "base" and base["ratio_median"] == 1.0
    assert len(base["times"]) == len(taps["times"]) == 2 and min(taps["times"]) > 0
    assert taps["settings"] == {"taps": True, "dense": True}
    assert taps["compiler_options"] == {"xla_cpu_enable_concurrency_optimized_scheduler": "False"}
    # a bad variant is refused before anything compiles
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "step_variants.py"), "--variant", "x:taps=2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "taps takes 0 or 1" in proc.stderr
    # an option XLA does not know ends the run with a line naming the variant, not a traceback
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "step_variants.py"), "--tiny", "--rounds", "1",
         "--variant", "odd:xla_cpu_no_such_option=1"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and "--variant 'odd:xla_cpu_no_such_option=1'" in proc.stderr
    assert "xla_cpu_no_such_option" in proc.stderr and "Traceback" not in proc.stderr


def _conv_forms(tmp_path):
    out = tmp_path / "forms.json"
    stdout = _run("conv_forms.py", "--tiny", "--out", str(out))
    report = json.loads(out.read_text())
    forms = report["forms"]
    assert {"lax", "flat9", "rows3", "batch2", "batch4", "cout2"} <= set(forms)
    assert all(len(f["times"]) == 2 and f["median_s"] > 0 for f in forms.values())
    assert all(f["max_rel_error"] < 1e-5 for f in forms.values()), forms  # one function, all forms
    assert "rows3" in stdout


SMOKE = {
    "conv_forms.py": _conv_forms,
    "step_variants.py": _step_variants,
    "unet_vs_diffusers.py": _unet_vs_diffusers,
    "conv_kernels.py": _conv_kernels,
    "sampler_compile.py": _sampler_compile,
    "input_pipeline.py": _input_pipeline,
    "quality.py": _quality,
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    SMOKE[script](tmp_path)
