"""Forward process: q_sample in distribution, posterior by Bayes' rule, parameterisation conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import forward

Z = 5.0  # two-sided z-score for the moment tests: a false alarm has probability below 1e-6 per check


def two_sample_moments_agree(a, b):
    """Whether per-dimension means and variances of two samples [N, D] agree within Z standard errors."""
    n = a.shape[0]
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    mean_se = np.sqrt(va / n + vb / n)
    # Var of a sample variance of Gaussian data is 2 sigma^4 / (n - 1).
    var_se = np.sqrt(2 * va**2 / (n - 1) + 2 * vb**2 / (n - 1))
    return bool(
        np.all(np.abs(a.mean(0) - b.mean(0)) < Z * mean_se) and np.all(np.abs(va - vb) < Z * var_se)
    )


def test_q_sample_matches_the_one_step_chain_in_distribution():
    # Large betas so that one step more or less is a visible difference (the test's power check).
    sched = dj.make_schedule(betas=np.linspace(0.05, 0.3, 20))
    betas = np.linspace(0.05, 0.3, 20)
    x0 = np.array([1.0, -0.5, 0.0, 2.0])
    n = 20000
    rng = np.random.default_rng(0)
    for t in (0, 4, 19):
        # The paper's t = t + 1 transitions x_1 .. x_{t+1} from x_0, in float64 numpy.
        x = np.broadcast_to(x0, (n, 4)).copy()
        for s in range(t + 1):
            x = np.sqrt(1 - betas[s]) * x + np.sqrt(betas[s]) * rng.standard_normal(x.shape)
        noise = jax.random.normal(jax.random.key(t), (n, 4))
        xq = jax.jit(forward.q_sample)(
            sched, jnp.broadcast_to(x0, (n, 4)), jnp.full((n,), t), noise
        )
        assert two_sample_moments_agree(np.asarray(xq, np.float64), x), t
        if t > 0:  # an off-by-one in t is detected
            xq_off = forward.q_sample(
                sched, jnp.broadcast_to(x0, (n, 4)), jnp.full((n,), t - 1), noise
            )
            assert not two_sample_moments_agree(np.asarray(xq_off, np.float64), x), t


def test_q_mean_variance_closed_form():
    sched = dj.make_schedule("cosine", 100)
    x0 = jnp.linspace(-1, 1, 12).reshape(3, 2, 2)
    t = jnp.array([0, 50, 99])
    mean, var, logvar = forward.q_mean_variance(sched, x0, t)
    abar = np.cumprod(1 - dj.betas_for_schedule("cosine", 100))[np.asarray(t)][:, None, None]
    np.testing.assert_allclose(mean, np.sqrt(abar) * np.asarray(x0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, np.broadcast_to(1 - abar, (3, 2, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        logvar, np.log(np.broadcast_to(1 - abar, (3, 2, 2))), rtol=1e-5, atol=1e-6
    )


def test_posterior_matches_bayes_rule():
    name, T = "linear", 200
    sched = dj.make_schedule(name, T)
    betas = dj.betas_for_schedule(name, T)
    abar = np.cumprod(1 - betas)
    rng = np.random.default_rng(1)
    t = np.array([0, 1, 7, 100, 199])
    x0 = rng.uniform(-1, 1, (5, 3))
    xt = rng.standard_normal((5, 3))
    mean, var, logvar = jax.jit(forward.q_posterior_mean_variance)(sched, x0, xt, t)
    for i, ti in enumerate(t):
        if ti == 0:  # x_0 is known: a point mass at x_0
            np.testing.assert_allclose(mean[i], x0[i], rtol=1e-6, atol=1e-6)
            assert np.all(np.asarray(var[i]) == 0)
            continue
        # Prior q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}); likelihood
        # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t); multiply the Gaussians.
        prior_mean, prior_var = np.sqrt(abar[ti - 1]) * x0[i], 1 - abar[ti - 1]
        a, noise_var = np.sqrt(1 - betas[ti]), betas[ti]
        post_var = 1.0 / (1.0 / prior_var + a * a / noise_var)
        post_mean = post_var * (prior_mean / prior_var + a * xt[i] / noise_var)
        np.testing.assert_allclose(mean[i], post_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[i], post_var, rtol=1e-5)
        np.testing.assert_allclose(logvar[i], np.log(post_var), rtol=1e-5)
    # The t = 0 log-variance is clipped to t = 1's (it would be log 0).
    np.testing.assert_allclose(
        logvar[0], np.log(betas[1] * (1 - abar[0]) / (1 - abar[1])), rtol=1e-5
    )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_prediction_conversions_round_trip(name):
    sched = dj.make_schedule(name, 1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 10, 500, 900, 998])
    xt = forward.q_sample(sched, x0, t, eps)
    v = forward.v_target(sched, x0, t, eps)
    tol = dict(
        rtol=1e-3, atol=2e-3
    )  # float32; the x0-from-eps conversion amplifies by 1/sqrt(abar)
    np.testing.assert_allclose(forward.predict_x0_from_eps(sched, xt, t, eps), x0, **tol)
    np.testing.assert_allclose(forward.predict_eps_from_x0(sched, xt, t, x0), eps, **tol)
    np.testing.assert_allclose(forward.predict_x0_from_v(sched, xt, t, v), x0, **tol)
    np.testing.assert_allclose(forward.predict_eps_from_v(sched, xt, t, v), eps, **tol)
    # v's definition (Salimans & Ho 2022).
    abar = np.asarray(sched.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(
        v, np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0, rtol=1e-5, atol=1e-5
    )
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        got_x0, got_eps = forward.to_x0_and_eps(sched, xt, t, out, pred)
        np.testing.assert_allclose(got_x0, x0, **tol)
        np.testing.assert_allclose(got_eps, eps, **tol)
        np.testing.assert_allclose(forward.training_target(sched, x0, t, eps, pred), out, rtol=1e-6)


def test_shape_errors():
    sched = dj.make_schedule("linear", 1000)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \(4,\)"):
        forward.q_sample(sched, x, jnp.zeros((3,), jnp.int32), x)
    with pytest.raises(ValueError, match="noise shape"):
        forward.q_sample(sched, x, jnp.zeros((4,), jnp.int32), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        forward.to_x0_and_eps(sched, x, jnp.zeros((4,), jnp.int32), x, "score")
