"""The optimiser, learning-rate schedule, EMA and one training step, against closed forms."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import tiny_config

from diffusion_jax import config_utils, trainer
from diffusion_jax.config_utils import EmaConfig, OptimConfig
from diffusion_jax.train_state import (
    TrainState,
    ema_decay,
    learning_rate_schedule,
    make_optimizer,
    update_ema,
)


def test_warmup_then_cosine_schedule():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, lr_schedule="cosine", end_lr_factor=0.1)
    lr = learning_rate_schedule(cfg, total_updates=110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(
        lr(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5
    )  # half-way down the cosine
    np.testing.assert_allclose(lr(110), 1e-4, rtol=1e-5)


def test_constant_schedule_after_warmup():
    lr = learning_rate_schedule(
        OptimConfig(learning_rate=2e-4, warmup_steps=5000), total_updates=800_000
    )
    np.testing.assert_allclose([lr(2500), lr(5000), lr(700_000)], [1e-4, 2e-4, 2e-4], rtol=1e-6)


def test_ema_decay_and_update():
    assert float(ema_decay(EmaConfig(decay=0.9999), 1)) == pytest.approx(0.9999)
    warm = EmaConfig(decay=0.999, warmup=True)
    np.testing.assert_allclose(
        [ema_decay(warm, 0), ema_decay(warm, 10), ema_decay(warm, 10**6)],
        [0.1, 11 / 20, 0.999],
        rtol=1e-6,
    )
    ema = update_ema({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}, jnp.float32(0.75))
    np.testing.assert_allclose(ema["w"], [0.75 * 1 + 0.25 * 3, 0.75 * 2], rtol=1e-6)


def points_config(**optim):
    config = tiny_config()
    config.data.source = "moons"
    config.data.num_points = 64
    config.model = {
        "name": "mlp",
        "hidden": 32,
        "num_layers": 1,
        "num_classes": 2,
        "dtype": "bfloat16",
    }
    for key, value in optim.items():
        config.optim[key] = value
    return config_utils.parse_config(config)


def test_gradient_accumulation_updates_params_and_ema_every_k_batches():
    """optax.MultiSteps with k = 2, bfloat16 compute, float32 master weights."""
    cfg = points_config(grad_accum_steps=2)
    model = config_utils.build_model(cfg)
    tx, lr = make_optimizer(cfg.optim, cfg.train.num_steps)
    state = trainer.init_state(model, cfg, (2,), tx)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    step = jax.jit(trainer.make_train_step(model, cfg, tx, lr))
    schedule = config_utils.build_schedule(cfg)
    rng = np.random.default_rng(0)
    batch = lambda: {
        "x": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 2, 8), jnp.int32),
    }

    one, metrics = step(state, batch(), schedule)
    assert int(one.step) == 1 and bool(metrics["finite"])
    chex.assert_trees_all_equal(one.params, state.params)  # accumulated, not applied
    chex.assert_trees_all_equal(one.ema_params, state.ema_params)
    two, _ = step(one, batch(), schedule)
    assert not np.allclose(two.params["dense_in"]["kernel"], state.params["dense_in"]["kernel"])
    assert not np.allclose(
        two.ema_params["dense_in"]["kernel"], state.ema_params["dense_in"]["kernel"]
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(two.params))


def test_a_dropped_micro_batch_keeps_the_ema_in_step_with_the_optimizer():
    """k = 2 and batches g1, NaN, g2, g3: the NaN batch is dropped and not counted, so the update
    (mean of g1 and g2) comes at the third batch, and the EMA moves there, once, with the decay of
    update 1; the fourth batch only accumulates."""
    from diffusion_jax.train_state import apply_gradients

    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, grad_accum_steps=2)
    ema_cfg = EmaConfig(decay=0.9, warmup=False)
    tx, _ = make_optimizer(cfg, 100)
    params = {"w": jnp.array([1.0, -2.0])}
    state = TrainState.create(params, tx, jax.random.key(0))
    step = jax.jit(lambda s, g: apply_gradients(s, jnp.sum(g["w"]), g, tx, ema_cfg, 2))
    g1, g2, g3 = ({"w": jnp.array(v)} for v in ([1.0, 2.0], [3.0, -1.0], [0.5, 0.5]))
    nan = {"w": jnp.array([jnp.nan, 1.0])}
    state, _, ok1 = step(state, g1)
    state, _, ok2 = step(state, nan)
    assert bool(ok1) and not bool(ok2)
    chex.assert_trees_all_equal(state.ema_params, params)
    state, _, _ = step(state, g2)
    # Adam's first update is lr * sign of the mean gradient (m / sqrt(v) with bias correction).
    mean = (np.array([1.0, 2.0]) + np.array([3.0, -1.0])) / 2
    moved = np.array([1.0, -2.0]) - 0.1 * mean / (np.abs(mean) + 1e-8)
    np.testing.assert_allclose(state.params["w"], moved, rtol=1e-5)
    np.testing.assert_allclose(
        state.ema_params["w"], 0.9 * np.array([1.0, -2.0]) + 0.1 * moved, rtol=1e-6
    )
    after, _, _ = step(state, g3)  # accumulates only
    chex.assert_trees_all_equal(after.params, state.params)
    chex.assert_trees_all_equal(after.ema_params, state.ema_params)


def test_step_randomness_is_fold_in_of_the_step():
    cfg = points_config()
    model = config_utils.build_model(cfg)
    tx, _ = make_optimizer(cfg.optim, cfg.train.num_steps)
    state = trainer.init_state(model, cfg, (2,), tx)
    assert isinstance(state, TrainState)
    expected = jax.random.fold_in(trainer.rng_streams(cfg.seed)["train"], 3)
    np.testing.assert_array_equal(
        jax.random.key_data(state.replace(step=jnp.int32(3)).step_rng()),
        jax.random.key_data(expected),
    )
