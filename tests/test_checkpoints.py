"""Orbax checkpoints of a TrainState: round trip, keep-N, fallback past unreadable checkpoints."""

from __future__ import annotations

import gc
import json
import logging

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from _train_helpers import tiny_config

from diffusion_jax import checkpoints, config_utils
from diffusion_jax.train_state import TrainState


def small_state(value: float) -> TrainState:
    params = {"w": jnp.full((3, 4), value), "b": jnp.arange(4.0) + value}
    return TrainState.create(params, optax.adam(1e-3), jax.random.key(int(value))).replace(
        step=jnp.int32(value)
    )


def abstract(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


@pytest.fixture
def config():
    return config_utils.parse_config(tiny_config())


def save_steps(workdir, config, steps, keep=2):
    manager = checkpoints.make_manager(workdir, keep=keep)
    for step in steps:
        checkpoints.save(manager, step, small_state(float(step)), None, config, (8, 8, 1))
    manager.wait_until_finished()
    return manager


def test_round_trip_and_keep_n(tmp_path, config):
    manager = save_steps(tmp_path, config, [1, 2, 3])
    assert manager.all_steps() == [2, 3]
    state, step = checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    assert step == 3
    chex.assert_trees_all_equal(state, small_state(3.0))
    manager.close()


# A damaged checkpoint that reaches Orbax leaves TensorStore reads whose callbacks find asyncio's
# loop closed ("Exception ignored ... Event loop is closed", issue 21 item 11): checked first
# against its checksums, it never reaches Orbax.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, config, caplog):
    save_steps(tmp_path, config, [1, 2]).close()
    (tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt").write_bytes(b"truncated")
    manager = checkpoints.make_manager(tmp_path, keep=2)
    with caplog.at_level(logging.WARNING):
        state, step = checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    assert step == 1 and "checkpoint 2 in" in caplog.text and "is damaged" in caplog.text
    chex.assert_trees_all_equal(state, small_state(1.0))
    assert manager.all_steps() == [1]  # the bad one is set aside, so step 2 can be saved again
    manager.close()
    gc.collect()  # TensorStore's stray callbacks, if any, surface by now


def test_each_checkpoint_records_the_checksums_of_its_files(tmp_path, config):
    save_steps(tmp_path, config, [1, 2]).close()
    for step in (1, 2):
        step_dir = tmp_path / "checkpoints" / str(step)
        record = json.loads((step_dir / "checksums.json").read_text())
        on_disk = {
            p.relative_to(step_dir).as_posix()
            for p in step_dir.rglob("*")
            if p.is_file() and p.parent != step_dir and p.name != "commit_success.txt"
        }
        assert set(record["files"]) == on_disk and any(f.startswith("state/") for f in on_disk)
        assert checkpoints.verify_checksums(step_dir, step)


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_middle_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_makes_a_checkpoint_damaged(tmp_path, config, caplog):
    save_steps(tmp_path, config, [1, 2]).close()
    bad = largest_file(tmp_path / "checkpoints" / "2" / "state")
    flip_middle_byte(bad)
    manager = checkpoints.make_manager(tmp_path, keep=2)
    with caplog.at_level(logging.WARNING):
        state, step = checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    manager.close()
    assert step == 1 and "checkpoint 2 in" in caplog.text and "SHA-256 mismatch" in caplog.text
    assert bad.relative_to(tmp_path / "checkpoints" / "2").as_posix() in caplog.text
    chex.assert_trees_all_equal(state, small_state(1.0))


def test_a_checkpoint_without_checksums_is_read_unverified(tmp_path, config, caplog):
    """Saved before checksums existed (or killed before they were written): restored as it is, and
    one that fails to load still counts as damaged."""
    save_steps(tmp_path, config, [1, 2]).close()
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / "checksums.json").unlink()
    manager = checkpoints.make_manager(tmp_path, keep=2)
    assert checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)[1] == 2
    (tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        _, step = checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    manager.close()
    assert step == 1 and "checkpoint 2 in" in caplog.text
    assert "saved without checksums" in caplog.text


class FlakyRestore:
    """``CheckpointManager.restore`` failing its first ``failures`` calls with ``error``."""

    def __init__(self, monkeypatch, failures, error):
        self.real, self.failures, self.error, self.calls = (
            ocp.CheckpointManager.restore,
            failures,
            error,
            0,
        )
        monkeypatch.setattr(ocp.CheckpointManager, "restore", self)
        monkeypatch.setattr(checkpoints, "RETRY_DELAYS", (0.01, 0.01, 0.01), raising=False)

    def __get__(self, manager, owner):
        return lambda *args, **kwargs: self(manager, *args, **kwargs)

    def __call__(self, manager, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.real(manager, *args, **kwargs)


def test_a_transient_read_error_is_retried_not_rolled_back(tmp_path, config, monkeypatch, caplog):
    save_steps(tmp_path, config, [1, 2]).close()
    flaky = FlakyRestore(monkeypatch, 1, ConnectionResetError("connection reset by peer"))
    manager = checkpoints.make_manager(tmp_path, keep=2)
    with caplog.at_level(logging.WARNING):
        state, step = checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    assert step == 2 and flaky.calls == 2 and "trying again" in caplog.text
    chex.assert_trees_all_equal(state, small_state(2.0))
    assert manager.all_steps() == [1, 2] and not (tmp_path / "checkpoints.unreadable").exists()
    manager.close()


@pytest.mark.parametrize(
    "error",
    [TimeoutError("timed out"), ValueError("UNAVAILABLE: GCS returned 503 [tensorstore_spec=...]")],
)
def test_a_lasting_storage_error_stops_and_moves_nothing(tmp_path, config, monkeypatch, error):
    save_steps(tmp_path, config, [1, 2]).close()
    flaky = FlakyRestore(monkeypatch, 100, error)
    manager = checkpoints.make_manager(tmp_path, keep=2)
    with pytest.raises(OSError, match=r"checkpoint 2 in .* could not be read: 4 tries failed"):
        checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    assert flaky.calls == 4
    assert manager.all_steps() == [1, 2] and not (tmp_path / "checkpoints.unreadable").exists()
    manager.close()


def test_an_intact_checkpoint_that_fails_to_restore_is_not_set_aside(tmp_path, config, monkeypatch):
    """Never call a readable checkpoint unreadable: one that matches its checksums but fails to
    restore (here, a restore that raises) stops the run with the error and moves nothing."""
    save_steps(tmp_path, config, [1, 2]).close()
    FlakyRestore(monkeypatch, 100, KeyError("exhausted"))
    manager = checkpoints.make_manager(tmp_path, keep=2)
    with pytest.raises(
        RuntimeError, match=r"checkpoint 2 in .* not damaged.*KeyError: 'exhausted'"
    ):
        checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    assert manager.all_steps() == [1, 2] and not (tmp_path / "checkpoints.unreadable").exists()
    manager.close()


def test_no_checkpoint_restores_nothing(tmp_path):
    manager = checkpoints.make_manager(tmp_path)
    assert checkpoints.restore_latest(manager, abstract(small_state(0.0)), None) is None
    manager.close()


def test_workdir_config_check(tmp_path, config):
    checkpoints.check_workdir(tmp_path, config)  # no config.json yet: fine
    checkpoints.write_config(tmp_path, config)
    checkpoints.check_workdir(tmp_path, config)
    longer = tiny_config()  # how long, how fast, how often: may change between runs
    longer.train.num_steps = 1000
    longer.train.log_every_steps = 7
    longer.optim.learning_rate = 1e-4
    longer.optim.grad_clip_norm = 0.5
    longer.ema.decay = 0.99
    longer.checkpoint.every_steps = 3
    longer.sample.num_samples = 0
    longer.sample.sampler = "ddpm"
    longer.data.num_threads = 2
    longer.data.verify_images = False
    longer.sharding.fsdp_min_size = 1024
    checkpoints.check_workdir(tmp_path, config_utils.parse_config(longer))
    other = tiny_config()
    other.diffusion.num_timesteps = 200
    other.data.image_size = 16
    with pytest.raises(ValueError) as e:
        checkpoints.check_workdir(tmp_path, config_utils.parse_config(other))
    assert "diffusion.num_timesteps: 100 -> 200" in str(e.value)
    assert "data.image_size: 8 -> 16" in str(e.value)
    assert "Use a new --workdir" in str(e.value)


@pytest.mark.parametrize(
    "path, value, change",
    [
        ("seed", 3, "seed: 0 -> 3"),
        ("data.split", "all", "data.split: 'train' -> 'all'"),
        ("data.path", "x.npz", "data.path: '' -> 'x.npz'"),
        ("data.num_points", 100, "data.num_points: 0 -> 100"),
        ("train.batch_size", 16, "train.batch_size: 8 -> 16"),
        ("optim.grad_clip_norm", 0.0, "optim.grad_clip_norm: 1.0 -> 0.0"),
        ("optim.optimizer", "adamw", "optim.optimizer: 'adam' -> 'adamw'"),
        ("diffusion.time_sampling", "logit_normal", "diffusion.time_sampling: 'uniform' ->"),
    ],
)
def test_keys_that_define_a_run_cannot_change(tmp_path, config, path, value, change):
    checkpoints.write_config(tmp_path, config)
    other = tiny_config()
    section, _, key = path.rpartition(".")
    setattr(other[section] if section else other, key, value)
    with pytest.raises(ValueError, match="incompatible config") as e:
        checkpoints.check_workdir(tmp_path, config_utils.parse_config(other))
    assert change in str(e.value)


def test_write_run_makes_a_workdir_that_loads_and_names_a_wrong_tree(tmp_path, config):
    from diffusion_jax import trainer

    model = config_utils.build_model(config)
    params = config_utils.init_params(model, config, (8, 8, 1), jax.random.key(3))
    ema = jax.tree.map(lambda a: a + 1.0, params)
    trainer.write_run(tmp_path / "run", config, params, (8, 8, 1), step=7, ema_params=ema)
    loaded = checkpoints.load_sampler(tmp_path / "run")
    assert loaded.step == 7 and loaded.data_shape == (8, 8, 1)
    chex.assert_trees_all_equal(loaded.params, ema)  # sampling reads the EMA parameters
    assert checkpoints.read_config(tmp_path / "run") == config.to_dict()

    # With post-hoc EMA on, the workdir holds the state train.py resumes (its EMA profiles too).
    posthoc = tiny_config()
    posthoc.ema.posthoc_sigma_rels = (0.05, 0.1)
    posthoc = config_utils.parse_config(posthoc)
    trainer.write_run(tmp_path / "posthoc", posthoc, params, (8, 8, 1), step=7, ema_params=ema)
    tx, _ = trainer.make_optimizer(posthoc.optim, posthoc.train.num_steps)
    target = jax.eval_shape(lambda: trainer.init_state(model, posthoc, (8, 8, 1), tx))
    manager = checkpoints.make_manager(tmp_path / "posthoc")
    state, step = checkpoints.restore_latest(manager, abstract(target), None, posthoc)
    manager.close()
    assert step == 7 and len(state.posthoc_emas) == 2
    chex.assert_trees_all_equal(state.params, params)
    chex.assert_trees_all_equal(state.posthoc_emas[1], ema)

    wrong = {k: v for k, v in params.items() if k != "conv_in"}
    with pytest.raises(ValueError, match=r"missing \['conv_in'\]\['kernel'\]"):
        trainer.write_run(tmp_path / "other", config, wrong, (8, 8, 1))
