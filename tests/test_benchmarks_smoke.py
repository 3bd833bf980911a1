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
NOT_SCRIPTS = {"__init__", "common"}  # the package and the setup the scripts share


def _run(script: str, *args: str, timeout: float = 300) -> str:
    """``python -m benchmarks.<script> *args`` from the repository root; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {f[: -len(".py")] for f in os.listdir(BENCH) if f.endswith(".py")} - NOT_SCRIPTS
    missing, stale = sorted(scripts - set(SMOKE)), sorted(set(SMOKE) - scripts)
    assert not missing, (
        f"no smoke test for {', '.join(f'benchmarks/{m}.py' for m in missing)}: "
        "add a tiny-size run to SMOKE below"
    )
    assert not stale, f"SMOKE names {stale}: no such module in benchmarks/ (keys are module names)"


def _unet_vs_diffusers(tmp_path):
    out = tmp_path / "report.json"
    stdout = _run("unet_vs_diffusers", "--quick", "--tiny", "--out", str(out))
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
    stdout = _run("sampler_compile", "--tiny")
    assert "ddim" in stdout


def _input_pipeline(tmp_path):
    stdout = _run("input_pipeline", "--num-images", "8", "--batches", "1", "--batch-size", "4")
    assert "images/s" in stdout or stdout.strip()


def _quality(tmp_path):
    stdout = _run("quality", "--tiny", "--workdir", str(tmp_path / "quality"))
    assert "| ddim | 2 |" in stdout


def _tpu_compile(tmp_path):
    from diffusion_jax import aot

    try:
        aot.topology_devices("v5e:2x2")
    except RuntimeError as e:
        pytest.skip(f"no TPU compiler for this jax: {e}")
    out = tmp_path / "report.json"
    stdout = _run("tpu_compile", "--tiny", "--breakdown", "3", "--json", str(out))
    (report,) = json.loads(out.read_text())
    assert report["program"] == "tiny: train_step" and report["compiled"] and report["fits"]
    assert report["flops"] > 0 and report["est_seconds"] > 0
    assert "| tiny: train_step | v5e:2x2" in stdout
    assert (
        "| optimiser, EMA, update |" in stdout and report["traffic"]["optimiser, EMA, update"] > 0
    )


def _step_time(tmp_path):
    stdout = _run("step_time", "--tiny", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["config"] for r in rows] == ["tiny", "digits_dit"]
    assert all(r["step_seconds"] > 0 and r["num_params"] > 0 for r in rows)
    assert "| digits_dit | dit |" in stdout


def _latent_vs_pixel(tmp_path):
    workdir = tmp_path / "latent_vs_pixel"
    stdout = _run("latent_vs_pixel", "--tiny", "--seconds", "5", "--workdir", str(workdir))
    result = json.loads((workdir / "latent_vs_pixel.json").read_text())
    assert result["fd_ratio_latent_over_pixel"] > 0 and "FD(latent) / FD(pixel)" in stdout


SMOKE = {  # module name in benchmarks/ -> its tiny-size run
    "unet_vs_diffusers": _unet_vs_diffusers,
    "sampler_compile": _sampler_compile,
    "input_pipeline": _input_pipeline,
    "quality": _quality,
    "tpu_compile": _tpu_compile,
    "step_time": _step_time,
    "latent_vs_pixel": _latent_vs_pixel,
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    SMOKE[script](tmp_path)
