"""Orbax checkpoints of a TrainState: round trip, keep-N, fallback past unreadable checkpoints."""

from __future__ import annotations

import logging

import chex
import jax
import jax.numpy as jnp
import optax
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


def test_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, config, caplog):
    save_steps(tmp_path, config, [1, 2]).close()
    (tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt").write_bytes(b"truncated")
    manager = checkpoints.make_manager(tmp_path, keep=2)
    with caplog.at_level(logging.WARNING):
        state, step = checkpoints.restore_latest(manager, abstract(small_state(0.0)), None)
    assert step == 1 and "Checkpoint at step 2" in caplog.text
    chex.assert_trees_all_equal(state, small_state(1.0))
    assert manager.all_steps() == [1]  # the bad one is set aside, so step 2 can be saved again
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
