"""The same global batch and seed give the same training on 1, 2 or 4 devices, with parameters
replicated or FSDP-sharded, and across two processes joined by jax.distributed.

Each device layout compiles its own programs, so these runs train a small MLP on 2-D points (the
trainer's sharding does not depend on the model); the U-Net runs are in test_train*.py.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from _train_helpers import (
    POINTS,
    cache_dir,
    finish,
    free_port,
    load_state,
    param_leaves,
    run_worker,
    start_worker,
    stopped_at,
)

from diffusion_jax import checkpoints

RUN = [*POINTS, "--set", "train.num_steps=4", "--set", "checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return cache_dir(tmp_path_factory)


def train(tmp, cache, num_devices, *extra):
    out = run_worker(
        ["--workdir", str(tmp / "w"), "--out", str(tmp / "s.npz"), *RUN, *extra], cache, num_devices
    )
    assert out.returncode == 0, out.stdout
    assert f"{num_devices} device(s)" in out.stdout
    return load_state(tmp / "s.npz")


@pytest.fixture(scope="module")
def one_device(cache, tmp_path_factory):
    return train(tmp_path_factory.mktemp("one_device"), cache, 1)


def assert_close(a: dict, b: dict) -> None:
    """Equal up to float reassociation: summing a batch in another order changes the last bits."""
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("num_devices, fsdp_min_size", [(2, 0), (4, 0), (4, 64)])
def test_same_training_on_any_device_count(one_device, cache, tmp_path, num_devices, fsdp_min_size):
    state = train(tmp_path, cache, num_devices, "--set", f"sharding.fsdp_min_size={fsdp_min_size}")
    assert int(state[".step"]) == 4
    assert_close(param_leaves(state), param_leaves(one_device))
    assert_close(param_leaves(state, ".ema_params"), param_leaves(one_device, ".ema_params"))
    # The checkpoint of a 4-device (maybe FSDP-sharded) run loads onto this process's one device.
    ema, _ = checkpoints.load_ema_params(tmp_path / "w")
    flat = {
        ".ema_params" + jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(ema)[0]
    }
    assert flat.keys() == param_leaves(state, ".ema_params").keys()
    assert all(np.array_equal(flat[k], state[k]) for k in flat)


def test_two_processes_agree_with_each_other_and_with_one_process(one_device, cache, tmp_path):
    """2 processes x 2 devices, each reading half of every global batch; process 0 alone writes."""
    port, workdir = free_port(), tmp_path / "w"
    args = [
        "--workdir",
        str(workdir),
        *RUN,
        "--set",
        "sample.num_samples=8",
        "--num_processes",
        "2",
        "--port",
        str(port),
    ]
    procs = [
        start_worker(
            [*args, "--process_id", str(i), "--out", str(tmp_path / f"p{i}.npz")],
            cache,
            num_devices=2,
        )
        for i in range(2)
    ]
    for out in finish(procs):
        assert "2 process(es), 4 device(s)" in out and "4 per process" in out
    p0, p1 = load_state(tmp_path / "p0.npz"), load_state(tmp_path / "p1.npz")
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)
    assert_close(param_leaves(p0), param_leaves(one_device))
    assert sorted(p.name for p in (workdir / "checkpoints" / "4" / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json",
    ]  # fmt: skip
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    assert [p.name for p in (workdir / "samples").iterdir()] == ["step_00000004.png"]


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(cache, tmp_path):
    """JAX's preemption sync point: every process learns of the notice and saves at the same step."""
    port, workdir = free_port(), tmp_path / "w"
    long_run = [*POINTS, "--set", "train.num_steps=500", "--set", "checkpoint.every_steps=1000"]
    args = ["--workdir", str(workdir), *long_run, "--num_processes", "2", "--port", str(port)]
    procs = [
        start_worker([*args, "--process_id", "0"], cache, num_devices=2),
        start_worker([*args, "--process_id", "1", "--term_at", "20"], cache, num_devices=2),
    ]
    stops = []
    for out in finish(procs):
        stops.append(stopped_at(out))
    assert stops[0] == stops[1] and 20 <= stops[0] < 500
    assert [int(p.name) for p in (workdir / "checkpoints").iterdir()] == [stops[0]]


def run_two_processes(tmp_path, cache, workdirs, *extra) -> list[str]:
    """Both processes of a jax.distributed run; process i uses ``workdirs[i]`` and writes p<i>.npz."""
    port = free_port()
    procs = [
        start_worker(
            [
                "--workdir", str(workdirs[i]), *extra, "--num_processes", "2", "--port", str(port),
                "--process_id", str(i), "--out", str(tmp_path / f"p{i}.npz"),
            ],
            cache,
            num_devices=2,
        )
        for i in range(2)
    ]  # fmt: skip
    return finish(procs, timeout=180)


def test_processes_agree_on_the_step_to_restore_when_one_copy_is_damaged(cache, tmp_path):
    """Issue 21 item 8: process 1's copy of the newest checkpoint (8) has a flipped byte, process
    0's is intact. Each checks its own copy, they compare, and both restore step 4 (before, process
    1 restored 8 silently, or fell back alone and then hung in the set-aside barrier)."""
    workdir, copy = tmp_path / "w", tmp_path / "w_copy"
    run = [*POINTS, "--set", "checkpoint.every_steps=4"]
    run_two_processes(tmp_path, cache, [workdir, workdir], *run, "--set", "train.num_steps=8")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8]
    shutil.copytree(workdir, copy)
    files = [p for p in (copy / "checkpoints" / "8" / "state").rglob("*") if p.is_file()]
    bad = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))

    outs = run_two_processes(tmp_path, cache, [workdir, copy], *run, "--set", "train.num_steps=4")
    for out in outs:
        assert "Resuming from the checkpoint at step 4" in out, out
    assert "checkpoint 8 in" in outs[1] and "SHA-256 mismatch" in outs[1]
    assert "Checkpoint 8 in" in outs[0] and "damaged as process(es) [1] read it" in outs[0]
    p0, p1 = load_state(tmp_path / "p0.npz"), load_state(tmp_path / "p1.npz")
    assert int(p0[".step"]) == int(p1[".step"]) == 4
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)
    assert [int(p.name) for p in (workdir / "checkpoints").iterdir()] == [4]  # 8 set aside, once
    assert len(list((workdir / "checkpoints.unreadable").iterdir())) == 1
