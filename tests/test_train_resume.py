"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and restarted ends bit-for-bit where an
uninterrupted run does: params, EMA, optimiser state, step, PRNG key and data position all restored."""

from __future__ import annotations

import pytest
from _train_helpers import cache_dir, load_state, run_worker

STEPS = [
    "--set",
    "train.num_steps=8",
    "--set",
    "checkpoint.every_steps=4",
    "--set",
    "sample.num_samples=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """8 steps without interruption."""
    tmp = tmp_path_factory.mktemp("straight")
    out = run_worker(["--workdir", str(tmp / "w"), "--out", str(tmp / "state.npz"), *STEPS], cache)
    assert out.returncode == 0, out.stdout
    return load_state(tmp / "state.npz")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and (a[k] == b[k]).all())]
    assert not different, f"{len(different)} of {len(a)} leaves differ, e.g. {different[:3]}"


def test_resume_after_sigkill_is_bitwise_identical(straight, cache, tmp_path):
    workdir = str(tmp_path / "w")
    killed = run_worker(
        ["--workdir", workdir, *STEPS, "--kill_at", "6", "--after_checkpoint", "4"], cache
    )
    assert killed.returncode == -9, killed.stdout  # SIGKILL: no chance to save anything
    assert "SIGKILL at step 6" in killed.stdout
    resumed = run_worker(
        ["--workdir", workdir, "--out", str(tmp_path / "state.npz"), *STEPS], cache
    )
    assert resumed.returncode == 0, resumed.stdout
    assert "Resuming from the checkpoint at step 4" in resumed.stdout
    assert_bitwise_equal(load_state(tmp_path / "state.npz"), straight)


def test_sigterm_saves_exits_cleanly_and_resumes_bitwise(straight, cache, tmp_path):
    workdir = tmp_path / "w"
    stopped = run_worker(["--workdir", str(workdir), *STEPS, "--term_at", "5"], cache)
    assert stopped.returncode == 0, stopped.stdout
    assert "Stopped at step 5 on a termination request; checkpoint saved" in stopped.stdout
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 5]
    resumed = run_worker(
        ["--workdir", str(workdir), "--out", str(tmp_path / "state.npz"), *STEPS], cache
    )
    assert resumed.returncode == 0, resumed.stdout
    assert "Resuming from the checkpoint at step 5" in resumed.stdout
    state = load_state(tmp_path / "state.npz")
    assert int(state[".step"]) == 8
    assert_bitwise_equal(state, straight)
