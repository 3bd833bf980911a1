"""Probability-flow ODE log-likelihood against closed forms for Gaussian data.

For data x_0 ~ N(mu, R diag(s2) R^T) every marginal of x_t = alpha x_0 + sigma eps is Gaussian,
N(alpha mu, R diag(alpha^2 s2 + sigma^2) R^T), the oracle denoiser E[x_0 | x_t] is affine in x_t, and
the probability-flow ODE maps x(t_min) to x(1) by the affine transport that keeps each rotated
coordinate's z-score (x - alpha mu) / sqrt(alpha^2 s2 + sigma^2). So the ODE's log-likelihood is
known exactly: log p_{t_min}(x) + log N(x_1; 0, prior_std^2) - log p_1(x_1), the last two the
prior's stand-in error (zero for flow, where p_1 = N(0, I)).
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import forward
from diffusion_jax.evaluation import likelihood as lik
from diffusion_jax.processes import make_process

Z = 4.0  # standard errors allowed for Monte Carlo means (a false alarm has probability ~6e-5)


def rotation(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q


def gaussian_params(mu, s2, rot=None):
    mu = np.asarray(mu, np.float64)
    rot = np.eye(mu.shape[0]) if rot is None else rot
    return {"mu": jnp.asarray(mu, jnp.float32), "s2": jnp.asarray(s2, jnp.float32), "R": rot}


def oracle(process, prediction):
    """The exact denoiser for Gaussian data, called as the ODE calls a network."""

    def denoise_fn(params, x_in, model_t):
        mu, s2, rot = params["mu"], params["s2"], jnp.asarray(params["R"], jnp.float32)
        alpha, sigma = process.alpha_sigma(process.t_from_model_time(model_t))
        alpha, sigma = alpha[:, None], sigma[:, None]
        scale = forward.network_input_scale(
            alpha, sigma, prediction, process.kind, process.sigma_data
        )
        x = x_in if scale is None else x_in / scale
        y = (x - alpha * mu) @ rot  # rotated coordinates, independent N(0, var)
        var = alpha**2 * s2 + sigma**2
        x0 = mu + (alpha * s2 * y / var) @ rot.T
        eps = (sigma * y / var) @ rot.T
        return forward.output_target(x0, eps, alpha, sigma, prediction, process.sigma_data)

    return denoise_fn


def alpha_sigma64(process, t):
    """(alpha, sigma) at t as floats: VP as the process's float32 table gives them."""
    if process.kind == "vp":
        return tuple(float(v) for v in process.alpha_sigma(jnp.float32(t)))
    return tuple(float(v) for v in process.alpha_sigma(np.float64(t), np))


def marginal_log_density(params, x, alpha, sigma):
    """log N(x; alpha mu, R diag(alpha^2 s2 + sigma^2) R^T) in float64, [B]."""
    mu, s2, rot = (np.asarray(params[k], np.float64) for k in ("mu", "s2", "R"))
    y = (np.asarray(x, np.float64) - alpha * mu) @ rot
    var = alpha**2 * s2 + sigma**2
    return -0.5 * np.sum(np.log(2 * np.pi * var) + y**2 / var, axis=-1)


def expected_ode(process, params, x, x_T, t_min):
    """(exact log p_{t_min}(x), what the ODE should give, the exact x_1) in float64."""
    a0, s0 = alpha_sigma64(process, t_min)
    a1, s1 = alpha_sigma64(process, 1.0)
    exact = marginal_log_density(params, x, a0, s0)
    std = process.sigma_max if process.kind == "edm" else 1.0  # prior_std(sigma(1))
    x_T = np.asarray(x_T, np.float64)
    prior = -0.5 * np.sum(np.log(2 * np.pi * std**2) + x_T**2 / std**2, axis=-1)
    mismatch = prior - marginal_log_density(params, x_T, a1, s1)
    mu, s2, rot = (np.asarray(params[k], np.float64) for k in ("mu", "s2", "R"))
    ratio = np.sqrt((a1**2 * s2 + s1**2) / (a0**2 * s2 + s0**2))
    x1 = a1 * mu + ((np.asarray(x, np.float64) - a0 * mu) @ rot * ratio) @ rot.T
    return exact, exact + mismatch, x1


def draw_marginal(params, process, t, n, seed):
    """n points from the marginal at t (the data the likelihood is of), float32 [n, D]."""
    alpha, sigma = alpha_sigma64(process, t)
    mu, s2, rot = (np.asarray(params[k], np.float64) for k in ("mu", "s2", "R"))
    z = np.random.default_rng(seed).standard_normal((n, mu.shape[0]))
    return (alpha * mu + (z * np.sqrt(alpha**2 * s2 + sigma**2)) @ rot.T).astype(np.float32)


def ode_fn(process, prediction, **options):
    """Jitted (params, x, rng) -> (log_p, x_T) with the oracle."""
    fn = functools.partial(
        lik.ode_log_likelihood, oracle(process, prediction), process, prediction=prediction
    )
    return jax.jit(lambda params, x, rng: fn(params, x, rng, **options))


VP_LINEAR = make_process("vp", schedule=dj.make_schedule("linear", 1000), discrete=False)
VP_COSINE = make_process("vp", schedule=dj.make_schedule("cosine", 1000), discrete=False)
CASES = {
    "flow-flow": (make_process("flow"), "flow"),
    "flow-v": (make_process("flow"), "v"),
    "edm-edm": (make_process("edm"), "edm"),
    "edm-eps": (make_process("edm"), "eps"),
    "vp_linear-eps": (VP_LINEAR, "eps"),
    "vp_cosine-x0": (VP_COSINE, "x0"),
}
PARAMS3 = gaussian_params([0.3, -0.2, 0.1], [0.25, 0.5, 0.1])


@pytest.mark.parametrize("case", list(CASES))
def test_exact_trace_log_likelihood_matches_the_gaussian_density(case):
    # RK4's error falls as h^4: measured max errors on these points are ~1e-6 (flow), 1.4e-4 (EDM,
    # 2e-3 at 32 steps, 1e-5 at 128) and ~1e-6 (VP, stepped in log-SNR) at 64 steps; float32 rounding
    # floors them near 1e-5. 1e-3 nats is 7x the worst of them.
    process, prediction = CASES[case]
    t_min = lik.default_t_min(process)
    x = np.concatenate(
        [draw_marginal(PARAMS3, process, t_min, 12, 0), np.float32([[1.5, -1.5, 1.0]])]
    )
    log_p, x_T = ode_fn(process, prediction, num_steps=64, exact_trace=True)(
        PARAMS3, x, jax.random.key(0)
    )
    chex.assert_shape(log_p, (13,))
    chex.assert_shape(x_T, (13, 3))
    exact, expected, x1 = expected_ode(process, PARAMS3, x, x_T, t_min)
    np.testing.assert_allclose(np.asarray(log_p, np.float64), expected, rtol=0, atol=1e-3)
    _, s1 = alpha_sigma64(process, 1.0)
    np.testing.assert_allclose(np.asarray(x_T, np.float64) / s1, x1 / s1, rtol=0, atol=1e-3)
    if process.kind == "flow":  # p_1 = N(0, I): the ODE's log-likelihood is the data's log density
        np.testing.assert_allclose(np.asarray(log_p, np.float64), exact, rtol=0, atol=1e-3)
    else:  # the prior's stand-in error is what the docstring bounds (~1e-2 nats per dimension)
        assert np.max(np.abs(expected - exact)) < 0.05
    # Too few steps is visibly wrong (the tolerance above is not vacuous) for the curved paths.
    if process.kind == "edm":
        coarse, _ = ode_fn(process, prediction, num_steps=4, exact_trace=True)(
            PARAMS3, x, jax.random.key(0)
        )
        assert np.max(np.abs(np.asarray(coarse, np.float64) - expected)) > 1e-2


def test_hutchinson_estimates_are_unbiased_with_the_expected_variance():
    # A rotated covariance so that df/dx is not diagonal and Rademacher probes are noisy too.
    dim, n = 4, 512
    params = gaussian_params([0.2, -0.4, 0.0, 0.5], [0.3, 0.05, 0.6, 0.15], rotation(dim, 1))
    process, prediction = VP_LINEAR, "eps"
    t_min = lik.default_t_min(process)
    x = draw_marginal(params, process, t_min, n, 2)
    results = {}
    for probe, num_probes in (("gaussian", 1), ("rademacher", 1), ("rademacher", 4)):
        run = ode_fn(process, prediction, num_steps=32, probe=probe, num_probes=num_probes)
        log_p, x_T = run(params, x, jax.random.key(3))
        _, expected, _ = expected_ode(process, params, x, x_T, t_min)
        err = np.asarray(log_p, np.float64) - expected
        se = err.std(ddof=1) / math.sqrt(n)
        assert abs(err.mean()) < Z * se, (probe, num_probes, err.mean(), se)
        results[probe, num_probes] = err.var(ddof=1)
    # The estimator is random (the test above has power) and averaging probes reduces the variance
    # (4 probes: 1/4 of it, up to the sampling error of a variance from 512 points, ~6% each).
    assert results["gaussian", 1] > 1e-3 and results["rademacher", 1] > 1e-3
    assert 0.15 < results["rademacher", 4] / results["rademacher", 1] < 0.4
    # Gaussian probes have the larger variance: 2 ||J||_F^2 against 2 sum_{i != j} J_ij^2.
    assert results["gaussian", 1] > results["rademacher", 1]


def test_rademacher_trace_is_exact_for_a_diagonal_jacobian():
    # With independent coordinates df/dx is diagonal and z^T J z = sum_i J_ii z_i^2 = tr J for z_i
    # = +-1: one Rademacher probe gives the exact trace, which a mis-scaled or mis-paired probe does
    # not.
    process, prediction = CASES["edm-edm"]
    x = draw_marginal(PARAMS3, process, 0.0, 8, 4)
    hutch, _ = ode_fn(process, prediction, num_steps=16)(PARAMS3, x, jax.random.key(5))
    exact, _ = ode_fn(process, prediction, num_steps=16, exact_trace=True)(
        PARAMS3, x, jax.random.key(5)
    )
    np.testing.assert_allclose(np.asarray(hutch), np.asarray(exact), rtol=0, atol=1e-4)


def test_bits_per_dim_is_the_log_likelihood_converted_by_hand():
    process, prediction = CASES["flow-flow"]
    fn = oracle(process, prediction)
    x = draw_marginal(PARAMS3, process, 0.0, 6, 6)
    kw = dict(prediction=prediction, num_steps=16, exact_trace=True)
    rng = jax.random.key(7)
    log_p, _ = lik.ode_log_likelihood(fn, process, PARAMS3, x, rng, **kw)
    bpd = lik.ode_bits_per_dim(fn, process, PARAMS3, x, rng, **kw)
    # bin width 2/256 on [-1, 1]: -log2 P ~ -log2(p * 2/256) = -log2 p + 7 per dimension.
    hand = -np.asarray(log_p, np.float64) / (3 * np.log(2.0)) + 7.0
    np.testing.assert_allclose(np.asarray(bpd, np.float64), hand, rtol=0, atol=1e-5)
    exact = marginal_log_density(PARAMS3, x, 1.0, 0.0)
    np.testing.assert_allclose(bpd, -exact / (3 * np.log(2.0)) + 7.0, rtol=0, atol=1e-4)


def test_dequantized_bits_per_dim_bounds_the_discrete_likelihood():
    # One 8-bit point k, dequantized 512 times. For the Gaussian model, x uniform in k's bin
    # [-1 + 2k/256, -1 + 2(k + 1)/256) gives E[-log p(x)] = sum_d 0.5 log(2 pi s2) + ((c - mu)^2
    # + w^2 / 12) / (2 s2) with c the bin's centre and w = 2/256, and Jensen puts it above the
    # discrete -log P(k) (the Gaussian's mass over the bin).
    mu, s2 = np.array([0.1, -0.3]), np.array([0.04, 0.09])
    params = gaussian_params(mu, s2)
    k = np.array([160, 75])
    x_grid = np.float32(lik.quantize_8bit(k / 127.5 - 1.0))
    n = 512
    batch = np.broadcast_to(x_grid, (n, 2))
    process, prediction = CASES["flow-flow"]
    fn = oracle(process, prediction)
    run = jax.jit(
        lambda p, x, rng: lik.ode_bits_per_dim(
            fn, process, p, x, rng, dequantize=True, prediction=prediction, num_steps=32,
            exact_trace=True,
        )
    )  # fmt: skip
    bpd = np.asarray(run(params, batch, jax.random.key(8)), np.float64)
    w = 2.0 / 256.0
    lo, c = -1.0 + w * k, -1.0 + w * (k + 0.5)
    expected_nats = np.sum(0.5 * np.log(2 * np.pi * s2) + ((c - mu) ** 2 + w**2 / 12) / (2 * s2))
    expected = expected_nats / (2 * np.log(2.0)) + 7.0
    se = bpd.std(ddof=1) / math.sqrt(n)
    assert se > 0
    assert abs(bpd.mean() - expected) < Z * se, (bpd.mean(), expected, se)
    cdf = lambda v: 0.5 * (1.0 + np.vectorize(math.erf)((v - mu) / np.sqrt(2 * s2)))
    discrete = -np.sum(np.log2(cdf(lo + w) - cdf(lo))) / 2
    assert discrete - Z * se < bpd.mean() < discrete + 0.01, (bpd.mean(), discrete)


def test_dequantize_8bit_draws_uniformly_within_each_bin():
    k = np.arange(256, dtype=np.float64)
    x = np.tile(lik.quantize_8bit(k / 127.5 - 1.0), (64, 1))
    deq = np.asarray(lik.dequantize_8bit(x, jax.random.key(9)), np.float64)
    pos = (deq + 1.0) * 128.0  # bin k is [k, k + 1) here
    np.testing.assert_array_equal(np.floor(pos), np.broadcast_to(k, pos.shape))
    frac = pos - k
    assert abs(frac.mean() - 0.5) < Z * math.sqrt(1 / 12 / frac.size)


def test_one_compiled_program_whatever_the_number_of_steps():
    process, prediction = VP_LINEAR, "eps"
    calls = []

    def counted(params, x_in, model_t):
        calls.append(1)
        return oracle(process, prediction)(params, x_in, model_t)

    x = draw_marginal(PARAMS3, process, 1e-3, 4, 10)
    programs = []
    for num_steps in (2, 50):
        del calls[:]
        jaxpr = jax.make_jaxpr(
            lambda proc, p, x, rng, n=num_steps: lik.ode_log_likelihood(
                counted, proc, p, x, rng, prediction=prediction, num_steps=n
            )
        )(process, PARAMS3, x, jax.random.key(0))
        assert len(calls) == 1  # the network is traced once, not once per step or stage
        # The program text, its numbers (the step count in the grid's shape) blanked out.
        programs.append(re.sub(r"[0-9]+", "#", str(jaxpr.jaxpr)))
    assert programs[0] == programs[1]

    # Under jit with the process itself a traced argument (its log alpha-bar table), traced once.
    @chex.assert_max_traces(n=1)
    def run(proc, p, x, rng):
        return lik.ode_log_likelihood(
            oracle(process, prediction), proc, p, x, rng, prediction=prediction, num_steps=32,
            exact_trace=True,
        )  # fmt: skip

    jitted = jax.jit(run)
    for seed in (11, 12):
        x = draw_marginal(PARAMS3, process, 1e-3, 4, seed)
        log_p, x_T = jitted(process, PARAMS3, x, jax.random.key(seed))
        _, expected, _ = expected_ode(process, PARAMS3, x, x_T, 1e-3)
        np.testing.assert_allclose(np.asarray(log_p, np.float64), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "process, prediction, options, message",
    [
        (make_process("vp", schedule=dj.make_schedule("linear", 100)), "eps", {}, "continuous"),
        (make_process("flow"), "eps", {}, "alpha = 0"),
        (make_process("flow"), "x0", {}, "sigma = 0"),
        (VP_LINEAR, "eps", {"t_min": 0.0}, "t_min > 0"),
        (VP_LINEAR, "eps", {"num_steps": 0}, "num_steps"),
        (VP_LINEAR, "eps", {"probe": "sphere"}, "probe"),
        (VP_LINEAR, "nope", {}, "prediction"),
    ],
)
def test_invalid_options_are_refused(process, prediction, options, message):
    with pytest.raises(ValueError, match=message):
        lik.ode_log_likelihood(
            oracle(VP_LINEAR, "eps"), process, PARAMS3, np.zeros((2, 3), np.float32),
            jax.random.key(0), prediction=prediction, **options,
        )  # fmt: skip
