"""Evaluation: bits/dim against an analytic oracle, distances against closed forms, the digits
feature extractor, and the sample export's file formats.

The bits/dim oracle: for data x_0 ~ N(0, s^2) discretized to the 256-level grid, the optimal
eps-predictor is (nearly) linear, eps_hat = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 -
abar), so every term of the bound has a closed-form expectation over x_t (the decoder term a 1-D
Gauss-Hermite integral). This file computes that expected bound independently in float64 and checks
the library's Monte Carlo bound against it (within 4 standard errors), and both against the exact
entropy of the discretized data, which lower-bounds any model's bits/dim.
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy import linalg, special, stats

import diffusion_jax as dj
from diffusion_jax import evaluation as ev
from diffusion_jax.evaluation import digits as digits_lib

# ----------------------------------------------------------------------------------------------
# Frechet distance


def _fd_scipy(f1, f2):
    """FID as the reference implementations write it: scipy.linalg.sqrtm of S1 S2, float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    b = 0.5 + rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    got = ev.frechet_distance_from_features(a, b)
    np.testing.assert_allclose(got, _fd_scipy(a, b), rtol=1e-9)
    assert got == pytest.approx(ev.frechet_distance_from_features(b, a), rel=1e-9)  # symmetric


def test_frechet_distance_is_zero_for_identical_sets():
    f = np.random.default_rng(1).standard_normal((100, 16))
    assert abs(ev.frechet_distance_from_features(f, f)) < 1e-9
    # Also with a singular covariance (fewer samples than dimensions).
    g = f[:10]
    assert abs(ev.frechet_distance_from_features(g, g)) < 1e-9


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """FD(N(m1, diag a), N(m2, diag b)) = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2."""
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    rotated = ev.frechet_distance(q @ m1, q @ np.diag(a) @ q.T, q @ m2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(want, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------------------------
# Precision and recall


def test_precision_recall_on_constructed_sets():
    """Reals: two tight clusters far apart. Fakes: copies of cluster A plus 5 points elsewhere.

    Every copy lies in the real manifold and the 5 strays do not: precision = 10/15. The fake
    manifold covers cluster A only: recall = 10/20.
    """
    rng = np.random.default_rng(0)
    cluster_a = rng.standard_normal((10, 2)) * 0.1
    cluster_b = rng.standard_normal((10, 2)) * 0.1 + [100.0, 0.0]
    strays = rng.standard_normal((5, 2)) * 0.1 + [50.0, 50.0]
    real = np.concatenate([cluster_a, cluster_b])
    fake = np.concatenate([cluster_a, strays])
    pr = ev.precision_recall(real, fake, k=3)
    assert pr["precision"] == pytest.approx(10 / 15)
    assert pr["recall"] == pytest.approx(10 / 20)
    assert ev.precision_recall(real, real, k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_matches_brute_force_loops():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((60, 3))
    fake = rng.standard_normal((45, 3)) * 1.5 + 0.5

    def radii(x, k):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.array([np.sort(row)[k] for row in d])  # index 0 is the point itself

    def coverage(manifold, r, queries):
        return np.mean(
            [
                any(np.linalg.norm(q - m) <= rm for m, rm in zip(manifold, r, strict=True))
                for q in queries
            ]
        )

    for k in (1, 3, 5):
        got = ev.precision_recall(real, fake, k=k)
        assert got["precision"] == pytest.approx(coverage(real, radii(real, k), fake))
        assert got["recall"] == pytest.approx(coverage(fake, radii(fake, k), real))
    np.testing.assert_allclose(ev.knn_radii(real, 3), radii(real, 3), rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# Distances for 2-D data


def _mean_norm_2d(shift, sigma):
    """E|Z| for Z ~ N(shift, sigma^2 I_2): sigma times the mean of a Rice(|shift| / sigma) variable."""
    return sigma * stats.rice.mean(np.linalg.norm(shift) / sigma)


def test_energy_distance_known_value_for_shifted_gaussians_and_floor():
    """For X ~ N(0, I_2), Y ~ N(delta, I_2): 2 E|X - Y| - E|X - X'| - E|Y - Y'| with X - Y ~ N(-delta, 2I)."""
    rng = np.random.default_rng(0)
    delta = np.array([1.0, 0.5])
    n = 4000
    x = rng.standard_normal((n, 2))
    y = rng.standard_normal((n, 2)) + delta
    want = 2 * _mean_norm_2d(delta, np.sqrt(2)) - 2 * _mean_norm_2d(np.zeros(2), np.sqrt(2))
    got = ev.energy_distance(x, y)
    floor = ev.split_floor(ev.energy_distance, np.concatenate([x, rng.standard_normal((n, 2))]))
    print(f"energy distance: {got:.4f} (closed form {want:.4f}), data-vs-data floor {floor:.4f}")
    # The estimate's standard deviation at this n is about 0.02 (measured over 10 seeds).
    assert got == pytest.approx(want, abs=0.08)
    assert abs(floor) < 0.02 and floor < want / 10
    # Identical sets: only the excluded self-distances differ, -2 E|X - X'| / (n - 1) ... at most.
    assert abs(ev.energy_distance(x, x)) < 4 * 1.8 / n


def test_sliced_wasserstein_shift_identity_and_known_value():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 2))
    delta = np.array([0.6, -0.8])  # |delta| = 1
    assert ev.sliced_wasserstein(x, x) == 0.0
    # Y = X + delta: every sorted projection differs by exactly theta . delta.
    theta = ev.distances.random_directions(2, 512, seed=3)
    exact = np.sqrt(np.mean((theta @ delta) ** 2))
    got = ev.sliced_wasserstein(x, x + delta, num_projections=512, seed=3)
    assert got == pytest.approx(exact, rel=1e-9)
    assert got == pytest.approx(1 / np.sqrt(2), rel=0.05)  # E (theta . delta)^2 = |delta|^2 / D
    # Independent samples: the same value up to sampling error; unequal sizes work too.
    y = rng.standard_normal((1500, 2)) + delta
    assert ev.sliced_wasserstein(x, y) == pytest.approx(1 / np.sqrt(2), abs=0.06)
    floor = ev.split_floor(ev.sliced_wasserstein, x)
    print(f"sliced W2 floor at n=1000: {floor:.4f}")
    assert floor < 0.1


# ----------------------------------------------------------------------------------------------
# Bits per dimension

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's linear schedule, written out independently
SCHEDULE = dj.make_schedule("linear", T)
S = 0.2  # data N(0, S^2), discretized to 256 levels
LEVELS = -1.0 + 2.0 * np.arange(256) / 255
HALF_BIN = 1.0 / 255


def _discretized_gaussian_probs(mu=0.0, s=S):
    upper = np.where(np.arange(256) == 255, 1.0, stats.norm.cdf((LEVELS + HALF_BIN - mu) / s))
    lower = np.where(np.arange(256) == 0, 0.0, stats.norm.cdf((LEVELS - HALF_BIN - mu) / s))
    return upper - lower


PROBS = _discretized_gaussian_probs()
ENTROPY_BITS = -np.sum(PROBS * np.log2(PROBS))  # the NLL of the data under its own distribution
DATA_VAR = np.sum(PROBS * LEVELS**2) - np.sum(PROBS * LEVELS) ** 2


def _coef(a, t, x):
    return a[t].reshape((-1,) + (1,) * (x.ndim - 1))


def oracle(mu, s2, *, learned):
    """The optimal denoiser for N(mu, s2) data; with ``learned`` also the exact reverse variance.

    The reverse step's true variance is beta-tilde_t + coef1_t^2 Var(x_0 | x_t), expressed as the
    learned-range interpolation v in [-1, 1] (clipped) and appended as the variance channels.
    """

    def denoise(params, x_t, t):
        abar = _coef(SCHEDULE.alphas_cumprod, t, x_t)
        eps = jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s2 + 1 - abar)
        if not learned:
            return eps
        var_x0 = s2 * (1 - abar) / (abar * s2 + 1 - abar)
        sigma2 = (
            _coef(SCHEDULE.posterior_variance, t, x_t)
            + _coef(SCHEDULE.posterior_mean_coef1, t, x_t) ** 2 * var_x0
        )
        lo = _coef(SCHEDULE.posterior_log_variance_clipped, t, x_t)
        hi = _coef(jnp.log(SCHEDULE.betas), t, x_t)
        v = jnp.clip(2 * (jnp.log(sigma2) - lo) / (hi - lo) - 1, -1, 1)
        return jnp.concatenate([eps, jnp.broadcast_to(v, x_t.shape)], axis=-1)

    return denoise


def _log_bin_prob(upper, lower):
    """log(Phi(upper) - Phi(lower)), stable in both tails (float64)."""
    flip = lower > 0
    a, b = np.where(flip, -lower, upper), np.where(flip, -upper, lower)
    log_a = special.log_ndtr(a)
    return log_a + np.log(-np.expm1(special.log_ndtr(b) - log_a))


def expected_bound_bits(mu, s2, variance):
    """E_{x_0, x_{1:T}}[negative bound] in bits/dim for the oracle, in float64 closed form.

    KL terms: q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, bt), p = N(c1 x0_hat + c2 x_t, Sigma) with
    x0_hat affine in x_t ~ N(sqrt(abar) x_0, 1 - abar), so E KL = 0.5 (log Sigma/bt + bt/Sigma - 1
    + c1^2 E(x_0 - x0_hat)^2 / Sigma). Decoder: Gauss-Hermite over x_1. Prior: closed form.
    """
    abar = np.cumprod(1 - BETAS)
    abar_prev = np.append(1.0, abar[:-1])
    bt = BETAS * (1 - abar_prev) / (1 - abar)
    c1 = BETAS * np.sqrt(abar_prev) / (1 - abar)
    lo = np.log(np.append(bt[1], bt[1:]))
    hi = np.log(BETAS)
    x0 = LEVELS[:, None]
    sa, sm = np.sqrt(abar)[None], np.sqrt(1 - abar)[None]
    slope = 1 / sa - (1 - abar[None]) / (
        sa * (abar[None] * s2 + 1 - abar[None])
    )  # x0_hat = slope x_t + icpt
    icpt = (1 - abar[None]) * mu / (abar[None] * s2 + 1 - abar[None])
    err_mean = x0 - slope * sa * x0 - icpt  # x_0 - x0_hat = err_mean - slope sm z
    err_std = slope * sm
    if variance == "learned_range":
        var_x0 = s2 * (1 - abar) / (abar * s2 + 1 - abar)
        v = np.clip(2 * (np.log(bt + c1**2 * var_x0) - lo) / (hi - lo) - 1, -1, 1)
        log_sigma = (v + 1) / 2 * hi + (1 - v) / 2 * lo
    elif variance == "fixed_small":
        log_sigma = lo
    else:
        log_sigma = np.log(np.append(bt[1], BETAS[1:]))
    sigma = np.exp(log_sigma)[None]
    kl = 0.5 * (log_sigma[None] - np.log(np.where(bt > 0, bt, 1.0))[None] + bt[None] / sigma - 1)
    kl = kl + 0.5 * c1[None] ** 2 * (err_mean**2 + err_std**2) / sigma
    z, w = hermegauss(80)
    w = w / w.sum()
    mean = x0 - (err_mean[:, :1] - err_std[:, :1] * z[None])  # decoder mean = x0_hat at t = 0
    sd = np.exp(0.5 * log_sigma[0])
    up, dn = (x0 + HALF_BIN - mean) / sd, (x0 - HALF_BIN - mean) / sd
    k = np.arange(256)[:, None]
    log_p = np.where(
        k == 0,
        special.log_ndtr(up),
        np.where(k == 255, special.log_ndtr(-dn), _log_bin_prob(up, dn)),
    )
    decoder = -(log_p * w).sum(1)
    prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * LEVELS**2)
    total = (prior + kl[:, 1:].sum(1) + decoder) / np.log(2)
    return float(np.sum(PROBS * total))


def monte_carlo_bound(denoise, variance, n, seed=0):
    """The library's bound, stratified over the grid: level k gets max(1, round(n p_k)) examples.

    Returns (estimate, standard error) of E_{x_0}[total_bpd] in bits/dim.
    """
    reps = np.maximum(1, np.round(n * PROBS)).astype(int)
    x0 = np.repeat(LEVELS, reps)[:, None].astype(np.float32)  # [N, 1]: one 1-channel dimension
    bpd = jax.jit(ev.make_bpd_fn(denoise, SCHEDULE, variance=variance))
    total = np.asarray(bpd(None, jax.random.key(seed), x0)["total_bpd"], np.float64)
    groups = np.split(total, np.cumsum(reps)[:-1])
    means = np.array([g.mean() for g in groups])
    pooled = np.mean(np.concatenate([g - g.mean() for g in groups if len(g) > 1]) ** 2)
    return float(np.sum(PROBS * means)), float(np.sqrt(np.sum(PROBS**2 * pooled / reps)))


def test_bpd_oracle_learned_variance_is_within_a_tiny_gap_of_the_entropy():
    """With the optimal mean and variance, the bound is the data's exact NLL plus 0.0009 bits/dim."""
    exact = expected_bound_bits(0.0, DATA_VAR, "learned_range")
    gap = exact - ENTROPY_BITS
    assert 0.0 <= gap < 0.002, gap
    est, se = monte_carlo_bound(oracle(0.0, DATA_VAR, learned=True), "learned_range", 32768)
    print(
        f"entropy {ENTROPY_BITS:.4f}; bound MC {est:.4f} +- {se:.4f}, expected {exact:.4f} (gap {gap:.4f})"
    )
    assert abs(est - exact) < 4 * se
    assert est > ENTROPY_BITS - 4 * se
    assert est - ENTROPY_BITS < 0.002 + 4 * se
    assert se < 0.01


@pytest.mark.parametrize("variance, gap", [("fixed_large", 0.126), ("fixed_small", 0.738)])
def test_bpd_oracle_fixed_variances_match_their_expected_bound(variance, gap):
    """The fixed variances are looser (their exact gaps are 0.126 and 0.738 bits/dim here)."""
    exact = expected_bound_bits(0.0, DATA_VAR, variance)
    assert exact - ENTROPY_BITS == pytest.approx(gap, abs=0.001)
    est, se = monte_carlo_bound(oracle(0.0, DATA_VAR, learned=False), variance, 8192)
    assert abs(est - exact) < 4 * se, (est, exact, se)


def test_bpd_wrong_denoiser_scores_worse():
    """A denoiser that believes the mean is 0.1 pays about 0.18 bits/dim (float64 closed form)."""
    right = expected_bound_bits(0.0, DATA_VAR, "learned_range")
    wrong = expected_bound_bits(0.1, DATA_VAR, "learned_range")
    assert wrong - right > 0.15
    est_right, _ = monte_carlo_bound(oracle(0.0, DATA_VAR, learned=True), "learned_range", 4096)
    est_wrong, se = monte_carlo_bound(oracle(0.1, DATA_VAR, learned=True), "learned_range", 4096)
    assert est_wrong - est_right == pytest.approx(wrong - right, abs=4 * se)
    assert est_wrong - est_right > 0.1


def _tiny_setup(num_timesteps=5):
    schedule = dj.make_schedule("cosine", num_timesteps)
    denoise = lambda params, x, t: params["w"] * x + 0.01 * t[:, None, None, None]
    x0 = ev.quantize_8bit(jax.random.uniform(jax.random.key(0), (3, 4, 4, 2), minval=-1, maxval=1))
    return schedule, denoise, {"w": jnp.float32(0.3)}, x0


def test_bpd_breakdown_sums_to_total_and_matches_a_loop_over_t():
    schedule, denoise, params, x0 = _tiny_setup()
    rng = jax.random.key(7)
    out = jax.jit(ev.make_bpd_fn(denoise, schedule, variance="fixed_large", clip_denoised=True))(
        params, rng, x0
    )
    chex.assert_shape(out["total_bpd"], (3,))
    chex.assert_shape(out["prior_bpd"], (3,))
    chex.assert_shape([out["vb_bpd"], out["x0_mse"], out["eps_mse"]], (3, 5))
    np.testing.assert_allclose(out["total_bpd"], out["prior_bpd"] + out["vb_bpd"].sum(1), rtol=1e-6)

    @jax.jit
    def term(t):  # the documented noise: eps for timestep t is normal(fold_in(rng, t))
        tt = jnp.full((3,), t)
        noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape)
        x_t = dj.q_sample(schedule, x0, tt, noise)
        output = denoise(params, x_t, tt)
        mv = dj.p_mean_variance(
            schedule, output, x_t, tt, variance="fixed_large", clip_denoised=True
        )
        return dj.vb_term_bpd(schedule, x0, x_t, tt, mv.mean, mv.log_variance)

    for t in range(5):
        np.testing.assert_allclose(out["vb_bpd"][:, t], term(t), rtol=1e-5)
    np.testing.assert_allclose(out["prior_bpd"], dj.prior_bpd(schedule, x0), rtol=1e-6)


def test_bpd_learned_range_endpoints_are_the_fixed_variances():
    schedule, denoise, params, x0 = _tiny_setup()
    rng = jax.random.key(1)
    with_v = lambda v: lambda p, x, t: jnp.concatenate([denoise(p, x, t), jnp.full_like(x, v)], -1)
    run = lambda fn, variance: jax.jit(ev.make_bpd_fn(fn, schedule, variance=variance))(
        params, rng, x0
    )
    small, large = run(denoise, "fixed_small"), run(denoise, "fixed_large")
    low, high = run(with_v(-1.0), "learned_range"), run(with_v(1.0), "learned_range")
    np.testing.assert_allclose(low["total_bpd"], small["total_bpd"], rtol=1e-6)
    # fixed_large uses beta-tilde_1 at t = 0 (improved-DDPM), learned_range's top end beta_0.
    np.testing.assert_allclose(high["vb_bpd"][:, 1:], large["vb_bpd"][:, 1:], rtol=1e-5)


def test_bpd_is_one_program_whatever_T():
    """All T terms run in one scan: the traced program does not grow with T, and traces once."""
    sizes = []
    for num_timesteps in (10, 200):
        schedule, denoise, params, x0 = _tiny_setup(num_timesteps)
        jaxpr = jax.make_jaxpr(ev.make_bpd_fn(denoise, schedule))(params, jax.random.key(0), x0)
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1 and scans[0].params["length"] == num_timesteps
        sizes.append(len(jaxpr.eqns))
    assert sizes[0] == sizes[1]
    bpd = jax.jit(chex.assert_max_traces(ev.make_bpd_fn(denoise, schedule), n=1))
    for seed in range(3):
        bpd(params, jax.random.key(seed), x0)


def test_evaluate_bpd_pads_the_last_batch_and_counts_each_example_once():
    schedule, denoise, params, _ = _tiny_setup()
    data = np.asarray(jax.random.uniform(jax.random.key(3), (10, 4, 4, 2), minval=-1, maxval=1))
    bpd_fn = jax.jit(ev.make_bpd_fn(denoise, schedule))
    got = ev.evaluate_bpd(bpd_fn, params, jax.random.key(0), data, batch_size=4)
    assert got["num_examples"] == 10
    direct = [
        bpd_fn(
            params,
            jax.random.fold_in(jax.random.key(0), i),
            ev.quantize_8bit(data[4 * i : 4 * i + 4]),
        )["total_bpd"]
        for i in range(3)
    ]
    np.testing.assert_allclose(got["bpd"], np.concatenate(direct).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["bpd"], got["prior_bpd"] + got["vb_bpd"].sum(), rtol=1e-5)
    assert got["decoder_bpd"] == got["vb_bpd"][0]


def test_quantize_8bit_and_uint8_agree_on_the_grid():
    grid = (-1.0 + 2.0 * np.arange(256) / 255).astype(np.float32)
    np.testing.assert_array_equal(ev.quantize_8bit(grid), grid)
    np.testing.assert_array_equal(ev.to_uint8(grid), np.arange(256))
    np.testing.assert_array_equal(ev.from_uint8(np.arange(256, dtype=np.uint8)), grid)
    np.testing.assert_array_equal(
        ev.to_uint8(np.array([-3.0, -1.0, 0.0, 0.999, 2.0])), [0, 0, 128, 255, 255]
    )


# ----------------------------------------------------------------------------------------------
# The digits feature extractor


def test_digits_split_matches_the_data_pipeline():
    from sklearn.datasets import load_digits

    from diffusion_jax import data

    images, labels = ev.load_digits_split("test")
    assert images.shape == (297, 16, 16, 1) and labels.shape == (297,)
    batches = list(data.make_eval_iterator(data.default_data_config(), batch_size=297))
    np.testing.assert_array_equal(images, batches[0]["x"])
    np.testing.assert_array_equal(labels, batches[0]["label"])
    raw = load_digits()
    np.testing.assert_array_equal(ev.digits_to_images(raw.data[1500:]), images)
    assert ev.load_digits_split("train")[0].shape == (1500, 16, 16, 1)


def test_digits_classifier_is_deterministic_and_accurate(tmp_path):
    short = {**digits_lib._RECIPE, "steps": 100}  # two fresh trainings (not the cache), shortened
    chex.assert_trees_all_equal(digits_lib._train(**short), digits_lib._train(**short))
    params = ev.train_digits_classifier()
    accuracy = ev.digits_accuracy(params)
    print(f"digits classifier held-out accuracy: {accuracy:.4f}")
    assert accuracy >= 0.93  # 0.949 measured
    # The on-disk cache gives back the same parameters.
    ev.train_digits_classifier(cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
    chex.assert_trees_all_equal(ev.train_digits_classifier(cache_dir=str(tmp_path)), params)


def test_digits_fd_floor_and_sensitivity():
    """The floor (train vs held-out features) is far below the FD of corrupted digits."""
    train = ev.digits_features(ev.load_digits_split("train")[0])
    test_images = ev.load_digits_split("test")[0]
    test = ev.digits_features(test_images)
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    # Features do not depend on the batch they are computed in (up to float32 rounding).
    np.testing.assert_allclose(
        ev.digits_features(test_images[:7], batch_size=3), test[:7], rtol=1e-4, atol=1e-4
    )
    floor = ev.frechet_distance_from_features(train, test)
    rng = np.random.default_rng(0)
    noisy = np.clip(test_images + 0.5 * rng.standard_normal(test_images.shape), -1, 1)
    fd_noisy = ev.frechet_distance_from_features(train, ev.digits_features(noisy))
    fd_noise = ev.frechet_distance_from_features(
        train, ev.digits_features(rng.uniform(-1, 1, test_images.shape))
    )
    pr = ev.precision_recall(train, test)
    print(
        f"digits FD floor {floor:.2f}; noisy digits {fd_noisy:.2f}; uniform noise {fd_noise:.2f}; PR floor {pr}"
    )
    assert floor < fd_noisy / 1.5 < fd_noise / 1.5
    assert pr["precision"] > 0.6 and pr["recall"] > 0.6


def test_digits_extractor_takes_8x8_samples_via_upsampling():
    images8, _ = __import__("diffusion_jax.data", fromlist=["load_digits"]).load_digits("test")
    np.testing.assert_array_equal(ev.upsample_digits(images8), ev.load_digits_split("test")[0])
    with pytest.raises(ValueError, match="16, 16, 1"):
        ev.digits_features(images8)


# ----------------------------------------------------------------------------------------------
# Sample export


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_and_png_round_trip(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 7, channels), dtype=np.uint8)
    path = ev.save_npz(str(tmp_path / "samples"), images)
    assert path.endswith(".npz")
    with np.load(path) as f:
        assert list(f.keys()) == ["arr_0"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 6, 7, channels)
    np.testing.assert_array_equal(ev.load_npz(path), images)
    paths = ev.save_pngs(str(tmp_path / "png"), images, start_index=10)
    assert [os.path.basename(p) for p in paths] == [f"{i:06d}.png" for i in range(10, 15)]
    np.testing.assert_array_equal(ev.load_pngs(paths), images)
    with pytest.raises(ValueError, match="uint8"):
        ev.save_npz(str(tmp_path / "bad"), images.astype(np.float32))


def test_export_samples_writes_the_documented_layout(tmp_path):
    x = np.linspace(-1, 1, 4 * 3 * 3).reshape(4, 3, 3, 1)
    paths = ev.export_samples(str(tmp_path), x, metadata={"sampler": "ddim", "num_steps": 50})
    assert os.path.basename(paths["npz"]) == "samples_4x3x3x1.npz"
    np.testing.assert_array_equal(ev.load_npz(paths["npz"]), ev.to_uint8(x))
    assert len(os.listdir(paths["png_dir"])) == 4
    info = json.load(open(paths["json"]))
    assert info["sampler"] == "ddim" and info["shape"] == [4, 3, 3, 1] and "arr_0" in info["layout"]
    assert ev.to_rgb(ev.to_uint8(x)).shape == (4, 3, 3, 3)


def test_generate_samples_uses_fixed_seeds():
    sample = lambda params, rng, shape: jax.random.uniform(rng, shape, minval=-1, maxval=1)
    a = ev.generate_samples(
        sample, None, num_samples=5, batch_size=2, image_shape=(2, 2, 1), seed=3
    )
    b = ev.generate_samples(
        sample, None, num_samples=5, batch_size=2, image_shape=(2, 2, 1), seed=3
    )
    assert a.shape == (5, 2, 2, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        a[2:4], sample(None, jax.random.fold_in(jax.random.key(3), 1), (2, 2, 2, 1))
    )


# ----------------------------------------------------------------------------------------------
# Inception-v3 (architecture and weight loading only: the real weights cannot be fetched here)


def _torch_layout_state_dict(rng):
    """Random weights named and laid out as pytorch-fid's state dict, from the Flax shapes.

    The inverse of the documented mapping, written independently: kernels HWIO -> OIHW, the
    classifier transposed, batch-norm statistics under running_mean / running_var.
    """
    from diffusion_jax.evaluation import inception

    shapes = jax.eval_shape(
        lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    )
    sd = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(dict(shapes)):
        keys = [p.key for p in path]
        collection, module, leaf_name = keys[0], keys[1:-1], keys[-1]
        name = ".".join(module)
        if leaf_name == "kernel" and module == ["fc"]:
            sd["fc.weight"] = rng.standard_normal(leaf.shape[::-1]).astype(np.float32) * 0.01
        elif leaf_name == "kernel":
            h, w, i, o = leaf.shape
            kernel = rng.standard_normal((o, i, h, w)) / np.sqrt(h * w * i)
            sd[name + ".weight"] = kernel.astype(np.float32)
        elif collection == "batch_stats":
            torch_name = {"mean": "running_mean", "var": "running_var"}[leaf_name]
            value = (
                rng.uniform(0.5, 1.5, leaf.shape)
                if leaf_name == "var"
                else rng.normal(0, 0.1, leaf.shape)
            )
            sd[f"{name}.{torch_name}"] = value.astype(np.float32)
        else:
            torch_name = {"scale": "weight", "bias": "bias"}[leaf_name]
            value = (
                rng.uniform(0.5, 1.5, leaf.shape)
                if leaf_name == "scale"
                else rng.normal(0, 0.1, leaf.shape)
            )
            sd[f"{name}.{torch_name}"] = value.astype(np.float32)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)  # present in real state dicts
    return sd


def test_inception_architecture_matches_torchvision_parameter_count():
    from diffusion_jax.evaluation import inception

    model = inception.InceptionV3()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    assert num_params == inception.NUM_PARAMS == 23_850_960
    features, logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 299, 299, 3)))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    x = inception.preprocess(jnp.zeros((2, 16, 16, 1)))
    assert x.shape == (2, 299, 299, 3)


def test_inception_state_dict_conversion_matches_a_float64_convolution():
    """One BasicConv2d block: torch-layout weights through the converter vs numpy conv + BN + ReLU."""
    from diffusion_jax.evaluation import inception

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 2))  # [O, I, kh, kw]: a non-square kernel catches transposes
    gamma, beta = rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.1, 4)
    mean, var = rng.normal(0, 0.1, 4), rng.uniform(0.5, 1.5, 4)
    sd = {
        "blk.conv.weight": w, "blk.bn.weight": gamma, "blk.bn.bias": beta,
        "blk.bn.running_mean": mean, "blk.bn.running_var": var,
    }  # fmt: skip
    variables = inception.variables_from_state_dict(sd)
    x = rng.standard_normal((2, 7, 6, 3))
    block = inception.BasicConv2d(4, (3, 2), strides=2, padding=(1, 0))
    got = block.apply({k: v["blk"] for k, v in variables.items()}, jnp.asarray(x, jnp.float32))
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))
    out_h, out_w = (7 + 2 - 3) // 2 + 1, (6 - 2) // 2 + 1
    want = np.zeros((2, out_h, out_w, 4))
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 2, :]  # [B, kh, kw, I]
            want[:, i, j, :] = np.einsum("bhwi,oihw->bo", patch, w)
    want = np.maximum((want - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_inception_loads_a_state_dict_file_and_extracts_features(tmp_path):
    from diffusion_jax.evaluation import inception

    sd = _torch_layout_state_dict(np.random.default_rng(0))
    path = str(tmp_path / "pt_inception.npz")
    np.savez(path, **sd)
    variables = inception.load_variables(path)
    np.testing.assert_array_equal(
        variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
        np.transpose(sd["Mixed_6b.branch7x7_2.conv.weight"], (2, 3, 1, 0)),
    )
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
        sd["Mixed_7c.branch_pool.bn.running_var"],
    )
    # A smaller input size (>= 75) keeps the CPU forward pass cheap; 299 is the real one.
    extract = inception.InceptionFeatures(variables, batch_size=2, size=75)
    images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32)
    feats = extract(images)
    assert feats.shape == (3, 2048) and np.all(np.isfinite(feats)) and feats.std() > 0
    np.testing.assert_allclose(extract(images[1:2]), feats[1:2], rtol=1e-4, atol=1e-5)
    del sd["Mixed_5b.branch_pool.conv.weight"]
    np.savez(path, **sd)
    with pytest.raises(ValueError, match="Mixed_5b"):
        inception.load_variables(path)


# ----------------------------------------------------------------------------------------------
# The evaluation command's pipeline


def _tiny_config(**overrides):
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from configs import tiny

    config = tiny.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def _points_config(**overrides):
    import ml_collections

    from diffusion_jax import config_utils

    config = _tiny_config(
        **{"data.source": "moons", "data.num_points": 300, "data.use_labels": False}, **overrides
    )
    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": 16, "num_layers": 1})
    config.diffusion.label_dropout = 0.0
    return config_utils.parse_config(config)


def test_evaluate_params_on_points_reports_distances_with_floors():
    from diffusion_jax import config_utils
    from diffusion_jax.evaluation import pipeline

    config = _points_config()
    params = config_utils.init_params(
        config_utils.build_model(config), config, (2,), jax.random.key(0)
    )
    result = pipeline.evaluate_params(
        params, config, (2,), metrics=("ed", "swd", "fd", "pr"), sampler="ddim", num_steps=5,
        num_samples=100,
    )  # fmt: skip
    assert result["features"] == "coordinates" and result["floor_examples"] == 100
    for name in ("ed", "swd", "fd", "precision", "recall"):
        assert np.isfinite(result[name]) and np.isfinite(result[name + "_floor"]), name
    # An untrained network is far from the data; fresh data is not.
    assert result["swd"] > 3 * result["swd_floor"]
    with pytest.raises(ValueError, match="8-bit"):
        pipeline.evaluate_params(params, config, (2,), metrics=("bpd",))


def test_evaluate_params_on_digits_reports_fd_pr_bpd_with_floors():
    """The tiny config (8x8 digits, T = 100) with untrained weights: the samples are upsampled for
    the digits features, and bits/dim carries all T terms."""
    from diffusion_jax import config_utils
    from diffusion_jax.evaluation import pipeline

    config = config_utils.parse_config(_tiny_config())
    model = config_utils.build_model(config)
    params = jax.jit(lambda k: config_utils.init_params(model, config, (8, 8, 1), k))(
        jax.random.key(0)
    )
    result = pipeline.evaluate_params(
        params, config, (8, 8, 1), metrics=("fd", "pr", "bpd"), sampler="ddim", num_steps=5,
        num_samples=16, bpd_examples=4,
    )  # fmt: skip
    assert result["features"] == "digits-mlp-64"
    assert result["num_samples"] == 16 and result["floor_examples"] == 16
    assert result["fd"] > result["fd_floor"] > 0
    assert result["fd"] > result["fd_train_floor"] > 0 and result["fd_train_floor_std"] > 0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall_floor"] <= 1
    assert 0 <= result["recall_train_floor"] <= 1
    assert result["bpd_examples"] == 4 and result["bpd_timesteps"] == 100
    assert result["bpd_variance"] == "fixed_large" and len(result["bpd_per_timestep"]) == 100
    np.testing.assert_allclose(
        result["bpd"], result["bpd_prior"] + sum(result["bpd_per_timestep"]), rtol=1e-6
    )


def test_evaluate_workdir_writes_json_and_tensorboard(tmp_path):
    """A 2-step run of a small MLP on 2-D points: the checkpoint, JSON and TensorBoard plumbing."""
    from diffusion_jax import trainer
    from diffusion_jax.evaluation import pipeline

    config = _points_config(
        **{"train.num_steps": 2, "checkpoint.every_steps": 2, "sample.num_samples": 0}
    )
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(config, workdir)
    result = pipeline.evaluate_workdir(
        workdir, metrics=("ed", "swd"), sampler="ddim", num_steps=5, num_samples=64
    )
    assert result["step"] == 2 and result["num_samples"] == 64
    saved = json.load(open(os.path.join(workdir, "eval", "step_00000002_ddim5.json")))
    assert saved["ed"] == result["ed"] and saved["swd_floor"] == result["swd_floor"]
    assert any("tfevents" in f for f in os.listdir(os.path.join(workdir, "tensorboard")))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        pipeline.evaluate_workdir(workdir, step=7)


def test_evaluate_workdir_reads_and_writes_a_gs_workdir(tmp_path):
    """``evaluate.py --workdir gs://...``: the checkpoint is read from the bucket and the JSON and
    TensorBoard events are written there; exported samples round-trip through a bucket (tests/_local_gcs.py serves the
    bucket from a local folder, in a subprocess so that no other test sees it)."""
    bucket = tmp_path / "bucket"
    code = f"""
import sys, json
sys.path.insert(0, "tests")
from _local_gcs import install
install({str(bucket)!r})
import jax
from diffusion_jax import config_utils, trainer
from diffusion_jax.evaluation import pipeline
from test_evaluation import _points_config
config = _points_config()
params = config_utils.init_params(config_utils.build_model(config), config, (2,), jax.random.key(0))
trainer.write_run("gs://b/run", config, params, (2,), step=3)
result = pipeline.evaluate_workdir(
    "gs://b/run", metrics=("ed",), sampler="ddim", num_steps=3, num_samples=32)
import numpy as np
from diffusion_jax import evaluation as ev
images = np.linspace(-1, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
paths = ev.export_samples("gs://b/exported", images)
same = (ev.load_npz(paths["npz"]) == ev.to_uint8(images)).all()
pngs = ev.load_pngs([paths["png_dir"] + "/000000.png", paths["png_dir"] + "/000001.png"])
print(json.dumps({{"json": result["json"], "workdir": result["workdir"], "ed": result["ed"],
                  "npz": paths["npz"], "same": bool(same and (pngs == ev.to_uint8(images)).all())}}))
"""
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["workdir"] == "gs://b/run"
    assert printed["json"] == "gs://b/run/eval/step_00000003_ddim3.json"
    run = bucket / "b" / "run"
    saved = json.loads((run / "eval" / "step_00000003_ddim3.json").read_text())
    assert saved["ed"] == printed["ed"] and saved["num_samples"] == 32
    assert not list((run / "eval").glob("*.tmp"))
    assert printed["npz"] == "gs://b/exported/samples_2x4x4x3.npz" and printed["same"]
    assert (bucket / "b" / "exported" / "samples.json").exists()
    assert any(f.name.startswith("events.out.tfevents") for f in (run / "tensorboard").iterdir())
    assert not (root / "gs:").exists()  # nothing went to a local "gs:" folder


def test_generate_samples_splits_batches_over_local_devices():
    """On 4 (fake) devices each batch is split over all four, with the same samples as on one."""
    code = """
import jax, numpy as np
from diffusion_jax.evaluation import export
seen = []
def sample(params, rng, shape):
    x = params["w"] * jax.random.normal(rng, shape)
    jax.debug.inspect_array_sharding(x, callback=lambda s: seen.append(len(s.device_set)))
    return x
params = {"w": np.float32(2.0)}
out = export.generate_samples(sample, params, num_samples=6, batch_size=4, image_shape=(3, 1))
ref = np.concatenate([sample(params, jax.random.fold_in(jax.random.key(0), i), (4, 3, 1))
                      for i in range(2)])[:6]
np.testing.assert_allclose(out, ref, rtol=1e-6)
print(len(jax.devices()), seen[0])
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "4"], proc.stdout


def test_evaluate_params_bpd_on_a_flow_process_is_the_ode_likelihood():
    """On a continuous process the pipeline's bits/dim is the probability-flow ODE's, computed batch
    by batch as :func:`ode_bits_per_dim` computes it (dequantized 8-bit data, the pipeline's key)."""
    from diffusion_jax import config_utils
    from diffusion_jax.evaluation import ode_bits_per_dim, pipeline, quantize_8bit

    config = config_utils.parse_config(
        _tiny_config(**{"diffusion.process": "flow", "diffusion.prediction": "flow"})
    )
    model = config_utils.build_model(config)
    params = jax.jit(lambda k: config_utils.init_params(model, config, (8, 8, 1), k))(
        jax.random.key(0)
    )
    result = pipeline.evaluate_params(
        params, config, (8, 8, 1), metrics=("bpd",), bpd_examples=3, ode_bpd_steps=4, seed=5
    )
    assert result["bpd_examples"] == 3 and "bpd_per_timestep" not in result
    assert "probability-flow ODE" in result["bpd_method"]
    held_out, labels = pipeline.load_split(config.data, config.data.eval_split)
    x = quantize_8bit(np.asarray(held_out[:3], np.float32))
    kwargs = {} if config.model.num_classes is None else {"y": jnp.asarray(labels[:3], jnp.int32)}
    expected = ode_bits_per_dim(
        config_utils.denoise_fn_for(model), config_utils.build_process(config), params,
        jnp.asarray(x), jax.random.fold_in(jax.random.key(7), 0), dequantize=True,
        prediction="flow", num_steps=4, **kwargs,
    )  # fmt: skip
    np.testing.assert_allclose(result["bpd"], float(np.mean(expected)), rtol=1e-5)
    with pytest.raises(ValueError, match="probability-flow ODE"):
        pipeline.evaluate_params(
            params, config, (8, 8, 1), metrics=("bpd",), bpd_variance="fixed_large"
        )
    # Results are named by the levels walked: num_steps=None is 18 on the flow, T on DDPM's process.
    assert pipeline._levels_walked(config, "euler", None) == 18
    ddpm = config_utils.parse_config(_tiny_config())
    assert pipeline._levels_walked(ddpm, "ddpm", None) == ddpm.diffusion.num_timesteps == 100
    assert pipeline._levels_walked(ddpm, "ddim", 7) == 7
