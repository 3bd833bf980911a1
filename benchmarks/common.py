"""Setup shared by the benchmark scripts: the U-Net they time and the environment they run in.

Import it as ``from benchmarks.common import ...`` from a script run as ``python -m
benchmarks.<name>`` in the repository root (which puts ``benchmarks`` and ``configs`` on the path).
"""

from __future__ import annotations

import os
from typing import Any


def model_settings(tiny: bool) -> dict[str, Any]:
    """Our UNet's settings: configs/cifar10.py's, or a tiny net for smoke tests."""
    if tiny:
        return dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
    from configs import cifar10

    m = cifar10.get_config().model
    return dict(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
    )


def worker_env(malloc_tunables: bool, xla_flags: bool) -> dict[str, str]:
    """This process's environment for a benchmark worker: with diffusion_jax.env's malloc settings
    (one arena, no mmap, no trimming) and, where that module suggests it, its CPU XLA flags."""
    from diffusion_jax.env import CPU_MALLOC_TUNABLES, CPU_XLA_FLAGS, cpu_xla_flags_hint

    env = dict(os.environ)
    if malloc_tunables:
        env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    if xla_flags and cpu_xla_flags_hint("cpu"):  # a jaxlib it was measured on, not set by the user
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + CPU_XLA_FLAGS).strip()
    return env


def time_train_step(config: Any, *, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """The training step of ``config`` (a ConfigDict from ``configs/``), exactly as ``train.py``
    builds it (:func:`diffusion_jax.trainer.build_programs`) on this machine's devices, timed on
    random data of the config's shape after ``warmup`` steps (the first compiles).

    Returns ``step_seconds`` (median over ``steps`` steps), ``step_cpu_seconds`` (this process's
    CPU time per step, all threads: steadier than wall time on a shared machine),
    ``compile_seconds`` (the first step),
    ``num_params`` and ``batch_size``."""
    import time

    import jax
    import numpy as np

    from diffusion_jax import config_utils, sharding, trainer

    cfg = config_utils.parse_config(config)
    mesh = sharding.make_mesh()
    data_shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    programs = trainer.build_programs(cfg, mesh, data_shape)
    state = jax.jit(
        lambda: trainer.init_state(programs.model, cfg, data_shape, programs.tx),
        out_shardings=programs.state_shardings,
    )()
    rng = np.random.default_rng(0)
    n = cfg.train.batch_size
    host = {"x": rng.uniform(-1, 1, (n, *data_shape)).astype(np.float32)}
    if "label" in programs.batch_keys:
        host["label"] = rng.integers(0, cfg.model.num_classes, (n,)).astype(np.int32)
    batch = sharding.global_batch(host, mesh)
    process = jax.device_put(programs.process, sharding.replicated(mesh))
    times, cpu = [], 0.0
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = programs.train_step(state, batch, process)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        if i >= warmup:
            cpu += time.process_time() - c0
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    return {
        "step_seconds": float(np.median(times[warmup:])),
        "step_cpu_seconds": cpu / steps,
        "compile_seconds": times[0],
        "num_params": num_params,
        "batch_size": n,
    }
