"""Training loss and variational-bound pieces against closed forms and float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import diffusion_jax as dj
from diffusion_jax import forward, losses


def test_loss_matches_hand_computation_for_each_target():
    sched = dj.make_schedule("cosine", 100)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (4, 3, 3, 2), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 50, 99])
    model_fn = lambda x_t, tt: 0.5 * x_t + 0.01 * tt[:, None, None, None]
    xt = np.asarray(forward.q_sample(sched, x0, t, noise), np.float64)
    out = 0.5 * xt + 0.01 * np.asarray(t)[:, None, None, None]
    abar = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
    targets = {
        "eps": np.asarray(noise),
        "x0": np.asarray(x0),
        "v": np.sqrt(abar) * np.asarray(noise) - np.sqrt(1 - abar) * np.asarray(x0),
    }
    for prediction, target in targets.items():
        for loss_type, f in (("l2", np.square), ("l1", np.abs)):
            got = jax.jit(
                lambda x0, rng, p=prediction, lt=loss_type: dj.diffusion_loss(
                    sched, model_fn, x0, rng, prediction=p, loss_type=lt, t=t, noise=noise
                )
            )(x0, jax.random.key(1))
            want = f(out - target).reshape(4, -1).mean(1)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weight_is_min_snr_times_the_x0_error(prediction):
    """Hang et al.: the weighted loss equals min(SNR, gamma) ||x0 - x0_hat||^2 for every target."""
    sched = dj.make_schedule("linear", 1000)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.uniform(k1, (5, 8), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 100, 400, 700, 999])
    delta = 0.1 * jax.random.normal(k3, x0.shape)
    target = forward.training_target(sched, x0, t, noise, prediction)
    model_fn = lambda x_t, tt: target + delta
    gamma = 5.0
    got = dj.diffusion_loss(
        sched,
        model_fn,
        x0,
        jax.random.key(0),
        prediction=prediction,
        min_snr_gamma=gamma,
        t=t,
        noise=noise,
    )
    xt = forward.q_sample(sched, x0, t, noise)
    x0_hat, _ = forward.to_x0_and_eps(sched, xt, t, target + delta, prediction)
    snr = np.asarray(sched.alphas_cumprod)[np.asarray(t)] / (
        1 - np.asarray(sched.alphas_cumprod)[np.asarray(t)]
    )
    want = np.minimum(snr, gamma) * np.mean(np.square(np.asarray(x0_hat) - np.asarray(x0)), axis=1)
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_timesteps_are_uniform_and_the_optimal_denoiser_reaches_the_bayes_error():
    """Gaussian data: E||eps - E[eps|x_t]||^2 per dimension is abar s^2 / (abar s^2 + 1 - abar)."""
    T, n, s = 10, 40_000, 0.5
    sched = dj.make_schedule(betas=np.linspace(0.05, 0.5, T))
    abar = np.cumprod(1 - np.linspace(0.05, 0.5, T))
    seen = []

    def optimal(x_t, t):
        seen.append(t)
        ab = sched.alphas_cumprod[t][:, None]
        return jnp.sqrt(1 - ab) * x_t / (ab * s**2 + 1 - ab)

    x0 = s * jax.random.normal(jax.random.key(0), (n, 1))
    loss = np.asarray(dj.diffusion_loss(sched, optimal, x0, jax.random.key(1)), np.float64)
    t = np.asarray(seen[0])
    counts = np.bincount(t, minlength=T)
    chi2 = stats.chisquare(counts)
    assert chi2.pvalue > 1e-4, counts  # uniform over 0..T-1
    bayes = abar * s**2 / (abar * s**2 + 1 - abar)
    for k in range(T):
        sel = loss[t == k]
        # The per-example loss is bayes_k * chi^2_1, whose standard deviation is bayes_k * sqrt(2).
        se = bayes[k] * math.sqrt(2.0 / sel.size)
        assert abs(sel.mean() - bayes[k]) < 5 * se, (k, sel.mean(), bayes[k])


def test_loss_errors():
    sched = dj.make_schedule("linear", 100)
    x0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown loss_type 'l3'"):
        dj.diffusion_loss(sched, lambda x, t: x, x0, jax.random.key(0), loss_type="l3")
    with pytest.raises(ValueError, match="unknown prediction"):
        dj.diffusion_loss(sched, lambda x, t: x, x0, jax.random.key(0), prediction="score")
    with pytest.raises(ValueError, match="model output shape"):
        dj.diffusion_loss(sched, lambda x, t: jnp.concatenate([x, x], -1), x0, jax.random.key(0))
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        dj.diffusion_loss(sched, lambda x, t: x, x0, jax.random.key(0), min_snr_gamma=0.0)


def test_normal_kl_against_numerical_integration():
    for m1, v1, m2, v2 in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.0, 0.3)]:
        p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
        lo, hi = m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1)
        ref = integrate.quad(
            lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, epsabs=1e-12
        )[0]
        got = losses.normal_kl(m1, math.log(v1), m2, math.log(v2))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_normal_kl_is_exact_for_identical_and_nearly_equal_gaussians():
    """0 exactly (and a zero gradient) for identical Gaussians; elsewhere, nearly equal variances
    included, the float64 KL of the same float32 inputs to 1e-6 relative (issue 22)."""
    means = np.array([-1.5, 0.0, 1e-3, 0.3], np.float32)
    logvars = np.array([-9.0, -1.0, -1e-3, 0.0, 0.7, 4.0], np.float32)
    m, lv = (a.ravel() for a in np.meshgrid(means, np.linspace(-10, 10, 201, dtype=np.float32)))
    kl = jax.jit(losses.normal_kl)
    np.testing.assert_array_equal(kl(m, lv, m, lv), 0.0)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(kl(*a)), argnums=(0, 1, 2, 3)))
    grads = grad(m, lv, m, lv)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)

    offsets = np.array([1e-6, -1e-4, 1e-2, -0.3, 0.4999, -0.6, 3.0, -12.0], np.float32)
    m1, lv1, m2, dv = (a.ravel() for a in np.meshgrid(means, logvars, means[::-1], offsets))
    lv2 = (lv1 + dv).astype(np.float32)
    got = np.asarray(kl(m1, lv1, m2, lv2), np.float64)
    m1, lv1, m2, lv2 = (a.astype(np.float64) for a in (m1, lv1, m2, lv2))
    d = lv1 - lv2
    ref = 0.5 * (np.expm1(d) - d + (m1 - m2) ** 2 * np.exp(-lv2))  # float64: cancels < 1e-9 rel.
    assert np.all(ref > 0)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_discretized_gaussian_likelihood_against_scipy():
    x = np.linspace(-1, 1, 256)
    for mean, std in [(0.0, 0.3), (0.4, 0.05), (-0.7, 1.5), (0.1, 0.01)]:
        got = np.asarray(
            losses.discretized_gaussian_log_likelihood(
                jnp.asarray(x, jnp.float32), mean, math.log(std)
            )
        )
        cdf = lambda z, mean=mean, std=std: stats.norm.cdf(z, mean, std)
        upper = np.where(x > 0.999, 1.0, cdf(x + 1 / 255))
        lower = np.where(x < -0.999, 0.0, cdf(x - 1 / 255))
        with np.errstate(divide="ignore"):
            ref = np.log(upper - lower)
        ok = ref > -20  # where float64 differences of CDFs are still accurate
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-4)
        # A proper distribution over the 256 values.
        np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(), 1.0, rtol=1e-5)


def test_discretized_gaussian_likelihood_in_the_far_tail():
    """Where the CDF difference underflows: log of the integral of the pdf over the bin, by quadrature."""
    mean, std = 0.0, 0.02
    for x in (0.3, -0.5, 0.9):
        lo, hi = (x - 1 / 255 - mean) / std, (x + 1 / 255 - mean) / std
        # Integrate phi over [lo, hi] relative to phi at the edge nearer the mean (no underflow).
        near = lo if lo > 0 else hi
        rel = integrate.quad(
            lambda z, near=near: math.exp(-(z * z - near * near) / 2),
            lo,
            hi,
            epsabs=0,
            epsrel=1e-12,
        )[0]
        ref = -near * near / 2 - 0.5 * math.log(2 * math.pi) + math.log(rel)
        got = float(losses.discretized_gaussian_log_likelihood(jnp.float32(x), mean, math.log(std)))
        np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_discretized_likelihood_gradients_are_finite():
    x = jnp.linspace(-1, 1, 256)
    f = lambda m, ls: jnp.sum(losses.discretized_gaussian_log_likelihood(x, m, ls))
    for m, ls in [(0.0, -1.0), (0.9, -6.0), (-2.0, 1.0), (0.0, -9.0)]:
        g = jax.grad(f, argnums=(0, 1))(jnp.float32(m), jnp.float32(ls))
        assert all(np.isfinite(np.asarray(v)) for v in g), (m, ls, g)


def test_prior_and_vb_terms():
    sched = dj.make_schedule("linear", 1000)
    x0 = jnp.linspace(-1, 1, 6).reshape(2, 3)
    abar = float(np.cumprod(1 - dj.betas_for_schedule("linear", 1000))[-1])
    kl = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * np.asarray(x0, np.float64) ** 2)
    np.testing.assert_allclose(losses.prior_bpd(sched, x0), kl.mean(1) / math.log(2), rtol=1e-4)
    assert (
        float(jnp.max(losses.prior_bpd(sched, x0))) < 1e-4
    )  # T=1000 linear: x_T is nearly N(0, I)
    # A model whose reverse step equals the true posterior pays nothing for t > 0.
    xt = jnp.full((2, 3), 0.3)
    t = jnp.array([5, 500])
    mean, _, logvar = forward.q_posterior_mean_variance(sched, x0, xt, t)
    np.testing.assert_allclose(losses.vb_term_bpd(sched, x0, xt, t, mean, logvar), 0.0, atol=1e-6)
    # At t = 0 the term is the decoder's negative log-likelihood in bits per dimension.
    t0 = jnp.array([0, 0])
    x0_8bit = jnp.round((x0 + 1) * 127.5) / 127.5 - 1
    m, lv = x0_8bit + 0.01, jnp.full_like(x0, -6.0)
    nll = -losses.discretized_gaussian_log_likelihood(x0_8bit, m, 0.5 * lv).mean(1) / math.log(2)
    np.testing.assert_allclose(losses.vb_term_bpd(sched, x0_8bit, xt, t0, m, lv), nll, rtol=1e-6)
