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
    longer = tiny_config()
    longer.train.num_steps = 1000
    longer.optim.learning_rate = 1e-4
    checkpoints.check_workdir(
        tmp_path, config_utils.parse_config(longer)
    )  # run settings may change
    other = tiny_config()
    other.diffusion.num_timesteps = 200
    other.data.image_size = 16
    with pytest.raises(ValueError) as e:
        checkpoints.check_workdir(tmp_path, config_utils.parse_config(other))
    assert "diffusion.num_timesteps: 100 -> 200" in str(e.value)
    assert "data.image_size: 8 -> 16" in str(e.value)
    assert "Use a new --workdir" in str(e.value)
