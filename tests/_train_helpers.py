"""Shared pieces of the trainer tests: a persistent compilation cache, the tiny config, workers.

Every trainer test compiles the same tiny U-Net programs; a compilation cache shared by the test
process and the worker subprocesses (one per pytest session) makes each compile happen once.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_train_worker.py"
if str(ROOT) not in sys.path:  # for `from configs import tiny`
    sys.path.insert(0, str(ROOT))

# A 2-D MLP run: the cheap model for the tests that must compile once per device layout.
# Class-conditional (two moons), with dropout and label dropout: every random stream is exercised.
POINTS = [
    "--set", "data.source=\"moons\"", "--set", "data.num_points=512",
    "--set", "model={\"name\": \"mlp\", \"hidden\": 32, \"num_layers\": 2, \"dropout\": 0.1, \"num_classes\": 2}",
    "--set", "diffusion.num_timesteps=50", "--set", "sample.num_samples=0",
]  # fmt: skip


@contextlib.contextmanager
def compilation_cache(directory: pathlib.Path):
    """Use (and then stop using) a persistent compilation cache in ``directory`` in this process."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    directory.mkdir(parents=True, exist_ok=True)
    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()
    try:
        yield directory
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        cc.reset_cache()


def cache_dir(tmp_path_factory) -> pathlib.Path:
    """The session's compilation cache (shared by all trainer test modules and their workers)."""
    return tmp_path_factory.getbasetemp() / "jax_compilation_cache"


def tiny_config():
    from configs import tiny

    return tiny.get_config()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(cache: pathlib.Path, num_devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env.pop("XLA_FLAGS", None)
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def start_worker(
    args: list[str], cache: pathlib.Path, num_devices: int | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=worker_env(cache, num_devices),
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_worker(
    args: list[str], cache: pathlib.Path, num_devices: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs tests/_train_worker.py to completion; returns returncode and the combined output."""
    proc = start_worker(args, cache, num_devices)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def load_state(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def param_leaves(state: dict[str, np.ndarray], prefix: str = ".params") -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """The combined outputs of processes that must all exit 0 (each killed if it overruns)."""
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        finally:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{out}"
    return outs


def stopped_at(out: str) -> int:
    """The step at which a worker saved and stopped on SIGTERM, from its log."""
    (line,) = [x for x in out.splitlines() if "on a termination request; checkpoint saved" in x]
    return int(line.split("Stopped at step ")[1].split()[0])
