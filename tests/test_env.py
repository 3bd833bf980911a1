"""The environment check on CPU with 1 and 4 fake devices."""

import json
import os
import subprocess
import sys

import pytest

from diffusion_jax.env import CPU_MALLOC_TUNABLES, cpu_malloc_hint


@pytest.mark.parametrize("devices", [1, 4])
def test_env_check_reports_devices(devices):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        GLIBC_TUNABLES=CPU_MALLOC_TUNABLES,
    )
    cmd = [sys.executable, "-m", "diffusion_jax.env", "--json", "--batch_size", "6"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["backend"] == "cpu"
    assert report["local_device_count"] == devices == report["global_device_count"]
    assert report["process_count"] == 1
    divides = any("does not divide" in w for w in report["warnings"])
    assert divides == (devices == 4), report["warnings"]
    text = subprocess.run(
        cmd[:3] + ["--batch_size", "8"], env=env, capture_output=True, text=True, check=True
    )
    assert f"{devices} local device(s), {devices} in all" in text.stdout
    assert "no problems found" in text.stdout


def test_env_check_with_distributed_runs_as_one_process_outside_a_cluster():
    """``--distributed`` joins a multi-process run as train.py does; with none it reports one process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID", "SLURM_"))
    }
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "diffusion_jax.env", "--json", "--distributed"]
    report = json.loads(
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    )
    assert (report["process_count"], report["global_device_count"]) == (1, 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_cpu_malloc_hint_names_the_missing_settings(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    hint = cpu_malloc_hint("cpu")
    assert hint is not None and f"GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}" in hint
    # The two settings without one arena still page-fault each step's temporaries (issue 7).
    monkeypatch.setenv(
        "GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
    )
    assert cpu_malloc_hint("cpu") is not None
    monkeypatch.setenv("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)
    assert cpu_malloc_hint("cpu") is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert cpu_malloc_hint("gpu") is None and cpu_malloc_hint("tpu") is None
