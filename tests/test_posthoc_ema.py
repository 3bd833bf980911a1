"""Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3 and App. C) against independent computations:
the profile's width by quadrature, the inner products and the least-squares solve by Gauss-Legendre
quadrature, the in-training update against a float64 loop of the recursion, reconstructions of
known trajectories against their directly computed averages, and one run end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import ROOT, tiny_config, worker_env

from diffusion_jax import checkpoints, config_utils, posthoc_ema, trainer
from diffusion_jax.posthoc_ema import (
    combine,
    gamma_to_sigma_rel,
    power_ema_step_size,
    power_ema_weights,
    profile_inner_products,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from diffusion_jax.train_state import (
    PosthocTrainState,
    TrainState,
    make_optimizer,
    update_posthoc_emas,
)

NODES, WEIGHTS = np.polynomial.legendre.leggauss(200)


def integrate(f, a: float, b: float) -> float:
    """Gauss-Legendre quadrature of f on [a, b] (float64), f smooth on (a, b]; from a = 0 over
    v = (tau / b)^(1/4), which smooths the tau^gamma of a profile (gamma = 0.5: sqrt) at 0."""
    if a == 0:
        v = 0.5 * NODES + 0.5
        return float(0.5 * np.sum(WEIGHTS * f(b * v**4) * 4 * b * v**3))
    x = 0.5 * (b - a) * NODES + 0.5 * (a + b)
    return float(0.5 * (b - a) * np.sum(WEIGHTS * f(x)))


def profile(t: float, gamma: float):
    """p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on (0, t] (EDM2 Eq. 121)."""
    return lambda tau: np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)


def integrate_pieces(f, breaks) -> float:
    """Quadrature of a function that is smooth between the sorted ``breaks`` (from 0)."""
    edges = np.unique(np.concatenate([[0.0], np.asarray(breaks, np.float64)]))
    return sum(integrate(f, a, b) for a, b in zip(edges[:-1], edges[1:], strict=True))


def power_ema_float64(trajectory: np.ndarray, gamma: float) -> np.ndarray:
    """[T, ...]: the average after each update t = 1..T of theta_hat <- beta theta_hat + (1 - beta)
    theta_t, beta = (1 - 1/t)^(gamma + 1) (EDM2 Eq. 127), in float64."""
    ema, out = np.zeros_like(trajectory[0], np.float64), []
    for t, theta in enumerate(np.asarray(trajectory, np.float64), start=1):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        ema = beta * ema + (1.0 - beta) * theta
        out.append(ema)
    return np.stack(out)


# ------------------------------------------------------------------------------------------------
# The profiles.


def test_sigma_rel_and_gamma_follow_eq_123_and_the_published_pairs():
    # EDM2 Sec. 3.1: sigma_rel = 0.05 and 0.10 are gamma = 16.97 and 6.94.
    np.testing.assert_allclose(sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=5e-3)
    gammas = np.array([0.0, 0.5, 1.0, 6.94, 16.97, 100.0])
    # sigma_rel is the profile's standard deviation over its length: its moments by quadrature.
    stds = []
    for g in gammas:
        p = profile(1.0, g)
        mean = integrate(lambda tau, p=p: tau * p(tau), 0.0, 1.0)
        var = integrate(lambda tau, p=p, m=mean: (tau - m) ** 2 * p(tau), 0.0, 1.0)
        stds.append(math.sqrt(var))
    np.testing.assert_allclose(gamma_to_sigma_rel(gammas), stds, rtol=1e-10)
    np.testing.assert_allclose(sigma_rel_to_gamma(stds), gammas, rtol=1e-9, atol=1e-9)
    for bad in (0.0, -0.1, 0.29, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize(
    "t_a, gamma_a, t_b, gamma_b",
    [(100, 6.94, 100, 16.97), (30, 16.97, 100, 6.94), (100, 0.0, 7, 3.5), (5, 2.0, 5, 2.0)],
)
def test_profile_inner_products_match_quadrature(t_a, gamma_a, t_b, gamma_b):
    product = lambda tau: profile(t_a, gamma_a)(tau) * profile(t_b, gamma_b)(tau)
    want = integrate(product, 0.0, min(t_a, t_b))
    got = profile_inner_products(t_a, gamma_a, t_b, gamma_b)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(profile_inner_products(t_b, gamma_b, t_a, gamma_a), want, rtol=1e-12)


def test_discrete_average_weighs_each_update_by_the_profile_over_its_interval():
    """Unrolling Eq. 127 gives update tau the integral of p_{t,gamma} over (tau - 1, tau]: the
    discrete average is exactly the continuous one of the piecewise-constant trajectory."""
    t, gamma = 40, 6.94
    recursion = power_ema_float64(np.eye(t), gamma)[-1]  # trajectory e_1, ..., e_t
    p = profile(t, gamma)
    quadrature = [integrate(p, tau - 1.0, tau) for tau in range(1, t + 1)]
    np.testing.assert_allclose(power_ema_weights(t, gamma), recursion, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(power_ema_weights(t, gamma), quadrature, rtol=1e-10, atol=1e-300)


def test_step_size_is_accurate_in_float32_for_long_runs():
    """1 - beta in float32 to ~1e-6 relative up to 2^31 updates; 1 - (1 - 1/t)^(gamma+1) computed
    in float32 would be 3% off at t = 10^6 (1 - 1/t rounds)."""
    t = np.array([1, 2, 3, 10, 1e3, 1e4, 1e6, 1e8, 2**31 - 1], np.float64)
    for gamma in (0.0, 6.94, 16.97):
        with np.errstate(divide="ignore"):  # t = 1: log1p(-1) = -inf, 1 - beta = 1
            exact = -np.expm1((gamma + 1) * np.log1p(-1 / t))  # float64
        got = jax.jit(power_ema_step_size)(gamma, jnp.asarray(t, jnp.float32))
        np.testing.assert_allclose(got, exact, rtol=2e-6)
    assert float(power_ema_step_size(6.94, 1)) == 1.0  # the first update forgets the start


def test_solve_is_the_least_squares_fit_by_quadrature_and_reports_its_error():
    t_in = np.repeat([20.0, 45.0, 70.0, 100.0], 2)
    gamma_in = np.tile(sigma_rel_to_gamma([0.05, 0.10]), 4)
    t_out, gamma_out = 100.0, float(sigma_rel_to_gamma(0.08))
    profiles = [profile(t, g) for t, g in zip(t_in, gamma_in, strict=True)]
    target = profile(t_out, gamma_out)
    gram = np.array(
        [
            [integrate_pieces(lambda s, p=p, q=q: p(s) * q(s), t_in) for q in profiles]
            for p in profiles
        ]
    )
    b = np.array([integrate_pieces(lambda s, p=p: p(s) * target(s), t_in) for p in profiles])
    want = np.linalg.solve(gram, b)
    want /= want.sum()
    x, error = solve_coefficients(t_in, gamma_in, t_out, gamma_out)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-9)
    residual = lambda s: (sum(c * p(s) for c, p in zip(x, profiles, strict=True)) - target(s)) ** 2
    want_error = math.sqrt(
        integrate_pieces(residual, t_in) / integrate(lambda s: target(s) ** 2, 0, t_out)
    )
    np.testing.assert_allclose(error, want_error, rtol=1e-6)
    assert 1e-4 < error < 0.05  # 0.08 is not exactly representable, but close


# ------------------------------------------------------------------------------------------------
# Reconstruction of known trajectories.

T, EVERY = 120, 10
SIGMA_RELS = (0.05, 0.10)


def trajectory() -> dict[str, np.ndarray]:
    """Parameters after updates 1..T: linear, quadratic and oscillating paths (float32)."""
    tau = np.arange(1, T + 1, dtype=np.float64)[:, None]
    return {
        "linear": np.float32(np.concatenate([1 + 0.01 * tau, -3 - 0.02 * tau], 1)),
        "quadratic": np.float32(0.5 + 2e-3 * tau - 1e-5 * tau**2),
        "wave": np.float32(np.sin(tau / 25.0) + 0.1 * np.cos(tau / 3.0)),
    }


@pytest.fixture(scope="module")
def tracked():
    """The in-training averages of SIGMA_RELS after every update (float32, under jit)."""
    cfg = config_utils.EmaConfig(posthoc_sigma_rels=SIGMA_RELS)
    path = trajectory()
    first = jax.tree.map(lambda a: jnp.asarray(a[0]), path)

    def step(emas, inputs):
        t, params = inputs
        emas = update_posthoc_emas(emas, params, cfg, t)
        return emas, emas

    _, history = jax.jit(lambda: jax.lax.scan(step, (first, first), (jnp.arange(1, T + 1), path)))()
    return jax.device_get(history)  # tuple over sigma_rels of trees [T, ...]


def reconstruct(history, sigma_rel: float, step: int):
    """The reconstruction at ``step`` from the snapshots every EVERY updates up to it."""
    steps = [s for s in range(EVERY, step + 1, EVERY)]
    rows = [(s, i) for s in steps for i in range(len(SIGMA_RELS))]
    t_in = [s for s, _ in rows]
    gamma_in = sigma_rel_to_gamma([SIGMA_RELS[i] for _, i in rows])
    x, error = solve_coefficients(t_in, gamma_in, step, float(sigma_rel_to_gamma(sigma_rel)))
    trees = (jax.tree.map(lambda a, s=s: a[s - 1], history[i]) for s, i in rows)
    return combine(trees, x), x, error


def test_update_equals_a_float64_loop_of_the_recursion(tracked):
    path = trajectory()
    for i, sigma_rel in enumerate(SIGMA_RELS):
        gamma = float(sigma_rel_to_gamma(sigma_rel))
        for key, values in path.items():
            np.testing.assert_allclose(
                tracked[i][key], power_ema_float64(values, gamma), rtol=2e-6, atol=2e-6
            )


@pytest.mark.parametrize("sigma_rel, step", [(0.10, T), (0.05, T), (0.05, 60), (0.10, 30)])
def test_a_tracked_width_at_a_snapshot_is_reconstructed_exactly(tracked, sigma_rel, step):
    """The representable case: the requested profile is a snapshot's, so the solve picks that
    snapshot alone and the reconstruction is its average, up to float32 rounding."""
    got, x, error = reconstruct(tracked, sigma_rel, step)
    i = SIGMA_RELS.index(sigma_rel)
    chosen = (step // EVERY - 1) * len(SIGMA_RELS) + i
    np.testing.assert_allclose(x, np.eye(len(x))[chosen], atol=1e-9)
    assert error < 1e-6
    for key, values in trajectory().items():
        direct = power_ema_float64(values, float(sigma_rel_to_gamma(sigma_rel)))[step - 1]
        np.testing.assert_allclose(got[key], tracked[i][key][step - 1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[key], direct, rtol=3e-6, atol=3e-6)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.08, 0.15, 0.25])
def test_another_width_is_within_the_bound_of_its_profile_error(tracked, sigma_rel):
    """Not representable: the error is integral r(s) theta(ceil s) ds, r = sum_i x_i p_i - p (the
    discrete average is the continuous one of the step path), and r integrates to 0, so by
    Cauchy-Schwarz |error| <= ||r|| ||theta - mean theta||, ||r|| = relative error * ||p||."""
    gamma = float(sigma_rel_to_gamma(sigma_rel))
    got, x, relative_error = reconstruct(tracked, sigma_rel, T)
    p_norm = math.sqrt(profile_inner_products(T, gamma, T, gamma))
    for key, values in trajectory().items():
        direct = power_ema_float64(values, gamma)[-1]
        spread = np.sqrt(np.sum((values - values.mean(0)) ** 2, axis=0))
        bound = relative_error * p_norm * spread
        rounding = 1e-5 * np.sum(np.abs(x)) * np.max(np.abs(values), axis=0)  # float32 snapshots
        assert np.all(np.abs(got[key] - direct) <= bound + rounding), (
            key,
            got[key] - direct,
            bound,
        )
        # ... and far better than the nearest tracked width alone.
        nearest = min(SIGMA_RELS, key=lambda s: abs(s - sigma_rel))
        alone = tracked[SIGMA_RELS.index(nearest)][key][-1]
        assert np.max(np.abs(got[key] - direct)) < 0.2 * np.max(np.abs(alone - direct))


# ------------------------------------------------------------------------------------------------
# Training.


def points_config(**ema):
    config = tiny_config()
    config.data.source = "moons"
    config.data.num_points = 64
    config.data.use_labels = False
    config.model = {"name": "mlp", "hidden": 16, "num_layers": 1}
    config.diffusion.num_timesteps = 50
    config.diffusion.label_dropout = 0.0
    config.sample.num_samples = 0
    for key, value in ema.items():
        config.ema[key] = value
    return config


def test_without_posthoc_the_state_is_the_classic_train_state():
    def abstract(config):
        cfg = config_utils.parse_config(config)
        model = config_utils.build_model(cfg)
        tx, _ = make_optimizer(cfg.optim, cfg.train.num_steps)
        return jax.eval_shape(lambda: trainer.init_state(model, cfg, (2,), tx))

    off = abstract(points_config())
    assert type(off) is TrainState
    assert {str(p[0]) for p, _ in jax.tree_util.tree_leaves_with_path(off)} == {
        ".step", ".params", ".ema_params", ".opt_state", ".rng", ".nonfinite_steps",
        ".first_nonfinite_step",
    }  # fmt: skip
    on = abstract(points_config(posthoc_sigma_rels=(0.05, 0.10)))
    assert type(on) is PosthocTrainState and len(on.posthoc_emas) == 2
    for ema in on.posthoc_emas:
        chex.assert_trees_all_equal_shapes_and_dtypes(ema, off.params)


def test_train_step_averages_the_kept_parameters_as_a_float64_loop():
    """Through the jitted step, with gradient accumulation over 2 batches: one EMA update per
    optimiser update (t = step // 2); a batch whose loss is not finite keeps the parameters, and
    the averages take them again. (Without accumulation the same code runs with t = step.)"""
    accum = 2
    config = points_config(posthoc_sigma_rels=(0.05, 0.10))
    config.optim.grad_accum_steps = accum
    cfg = config_utils.parse_config(config)
    model = config_utils.build_model(cfg)
    tx, lr = make_optimizer(cfg.optim, cfg.train.num_steps)
    state = trainer.init_state(model, cfg, (2,), tx)
    step = jax.jit(trainer.make_train_step(model, cfg, tx, lr))
    process = config_utils.build_process(cfg)
    rng = np.random.default_rng(0)
    kept = []  # parameters after each optimiser update
    for i in range(1, 6 * accum + 1):
        x = rng.normal(size=(8, 2)) if i != 3 * accum else np.full((8, 2), np.nan)
        state, metrics = step(state, {"x": jnp.asarray(x, jnp.float32)}, process)
        assert bool(metrics["finite"]) == (i != 3 * accum)
        if i % accum == 0:
            kept.append(jax.device_get(state.params))
    chex.assert_trees_all_equal(kept[2], kept[1])  # the dropped update
    for sigma_rel, ema in zip(cfg.ema.posthoc_sigma_rels, state.posthoc_emas, strict=True):
        gamma = float(sigma_rel_to_gamma(sigma_rel))
        want = jax.tree.map(lambda *p, g=gamma: power_ema_float64(np.stack(p), g)[-1], *kept)
        chex.assert_trees_all_close(ema, want, rtol=1e-5, atol=1e-6)


def test_a_run_saves_snapshots_and_the_command_writes_a_loadable_workdir(tmp_path, caplog):
    workdir, out = tmp_path / "run", tmp_path / "out"
    config = points_config(posthoc_sigma_rels=(0.05, 0.10), posthoc_every_steps=4)
    config.train.num_steps = 10
    config.checkpoint.every_steps = 8
    state = trainer.train_and_evaluate(config, workdir)
    assert posthoc_ema.snapshot_steps(workdir) == [4, 8, 10]  # the interval and the end
    classic = checkpoints.load_sampler(workdir)  # the run itself still samples its classic EMA
    chex.assert_trees_all_equal(classic.params, state.ema_params)

    cmd = [sys.executable, "-m", "diffusion_jax.posthoc_ema", f"--workdir={workdir}",
           "--sigma_rel=0.10", f"--output_workdir={out}"]  # fmt: skip
    run = subprocess.run(
        cmd, cwd=ROOT, env=worker_env(tmp_path / "cache"), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "relative L2 error" in run.stdout and "coefficient" in run.stdout
    loaded = checkpoints.load_sampler(out)
    assert loaded.step == 10 and loaded.data_shape == (2,)
    assert loaded.config.ema.posthoc_sigma_rels == ()
    # 0.10 is a tracked width: the reconstruction is the run's own average at step 10.
    chex.assert_trees_all_close(loaded.params, state.posthoc_emas[1], rtol=1e-6, atol=1e-7)
    record = json.loads((out / posthoc_ema.RECORD_FILE).read_text())
    assert [c["step"] for c in record["coefficients"]] == [4, 4, 8, 8, 10, 10]

    # Resuming from checkpoint 8 replaces the snapshot of step 10 (trained again, identically).
    rec = posthoc_ema.reconstruct(workdir, 0.08)
    shutil.rmtree(workdir / "checkpoints" / "10")
    caplog.set_level("WARNING")
    again = trainer.train_and_evaluate(config, workdir)
    assert "Deleted the post-hoc EMA snapshots of steps [10]" in caplog.text
    chex.assert_trees_all_equal(again.posthoc_emas, state.posthoc_emas)
    chex.assert_trees_all_equal(posthoc_ema.reconstruct(workdir, 0.08).params, rec.params)


def test_posthoc_config_is_checked_and_its_widths_define_the_run():
    parse = lambda **ema: config_utils.parse_config(points_config(**ema))
    assert parse(posthoc_sigma_rels=[0.05, 0.1]).ema.posthoc_sigma_rels == (0.05, 0.1)
    for bad, message in [((0.3,), "must be in"), ((0.1, 0.1), "repeats"), ((0.0,), "must be in")]:
        with pytest.raises(config_utils.ConfigError, match=message):
            parse(posthoc_sigma_rels=bad)
    with pytest.raises(config_utils.ConfigError, match="posthoc_every_steps"):
        parse(posthoc_every_steps=0)
    # The widths are arrays of the state (each averaged since step 1); the interval is not.
    assert config_utils.defines_run("ema.posthoc_sigma_rels")
    assert not config_utils.defines_run("ema.posthoc_every_steps")
    old = parse().to_dict()
    del old["ema"]["posthoc_sigma_rels"], old["ema"]["posthoc_every_steps"]  # a run from before
    assert config_utils.incompatible_changes(old, parse().to_dict()) == []
    assert config_utils.incompatible_changes(old, parse(posthoc_sigma_rels=(0.05,)).to_dict())
