"""The environment check on CPU with 1 and 4 fake devices."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("devices", [1, 4])
def test_env_check_reports_devices(devices):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
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
