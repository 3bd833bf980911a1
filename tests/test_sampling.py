"""Samplers against an analytic oracle, and the properties of ``sample(params, rng, shape)``.

For data x_0 ~ N(mu, diag(s^2)) the optimal eps-predictor is linear in x_t:
    E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),
so every sampler step driven by it is x' = A x + B + sigma z, and the exact mean and variance of the
sampler's output follow by propagating (m, v) -> (A m + B, A^2 v + sigma^2) from N(0, I), in float64,
written here from the papers' update equations (Ho et al. Algorithm 2; Song et al. eq. 12), not from
the library's code path (which goes through x0_hat and the posterior mean).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import sampling

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's linear schedule, written out independently
MU = np.array([0.5, -1.0, 0.0, 0.3, 2.0])
S = np.array([0.05, 0.2, 1.0, 2.0, 0.01])  # several widths, most well below 1
N = 20_000
Z = 5.0  # z-score of the tolerance: false alarm below 1e-6 per check


def oracle_eps(params, x_t, t):
    """The optimal eps-prediction for Gaussian data, from the schedule the sampler was given."""
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    mu, s = params["mu"], params["s"]
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)


def oracle_x0(params, x_t, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    mu, s = params["mu"], params["s"]
    return mu + jnp.sqrt(abar) * s**2 * (x_t - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)


def oracle_v(params, x_t, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    return jnp.sqrt(abar) * oracle_eps(params, x_t, t) - jnp.sqrt(1 - abar) * oracle_x0(
        params, x_t, t
    )


SCHEDULE = dj.make_schedule("linear", T)
PARAMS = {"mu": jnp.asarray(MU, jnp.float32), "s": jnp.asarray(S, jnp.float32)}


def exact_moments(steps, kind, *, eta=0.0, variance="fixed_small", eps_scale=1.0, var_scale=1.0):
    """Exact output mean and variance [D] of a sampler over the kept ``steps`` (increasing, 0-based).

    ``eps_scale`` and ``var_scale`` deliberately corrupt one coefficient, to show the test's power.
    """
    abar = np.cumprod(1 - BETAS)[np.asarray(steps)]
    m, v = np.zeros_like(MU), np.ones_like(MU)
    for i in reversed(range(len(steps))):
        ab, ab_prev = abar[i], abar[i - 1] if i > 0 else 1.0
        a = np.sqrt(1 - ab) / (ab * S**2 + 1 - ab)  # eps_hat = a x + b
        b = -a * np.sqrt(ab) * MU
        if kind == "ddpm":  # x' = (x - beta / sqrt(1 - abar) eps_hat) / sqrt(alpha) + sigma z
            alpha = ab / ab_prev
            beta = 1 - alpha
            c = eps_scale * beta / np.sqrt(1 - ab)
            A, B = (1 - c * a) / np.sqrt(alpha), -c * b / np.sqrt(alpha)
            if i == 0:
                sig2 = 0.0
            elif variance == "fixed_small":
                sig2 = beta * (1 - ab_prev) / (1 - ab)
            else:
                sig2 = beta
        else:  # x' = sqrt(abar') (x - sqrt(1 - abar) eps_hat) / sqrt(abar) + sqrt(1 - abar' - sigma^2) eps_hat + sigma z
            sig2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            k_eps = eps_scale * (np.sqrt(1 - ab_prev - sig2) - np.sqrt(ab_prev * (1 - ab) / ab))
            A, B = np.sqrt(ab_prev / ab) + k_eps * a, k_eps * b
        m, v = A * m + B, A * A * v + var_scale * sig2
    return m, v


def within_tolerance(samples, m, v):
    """Empirical mean and variance of [N, D] samples within Z standard errors of the exact (m, v)."""
    n = samples.shape[0]
    mean_err = np.abs(samples.mean(0) - m) / np.sqrt(v / n)
    var_err = np.abs(samples.var(0, ddof=1) - v) / (v * np.sqrt(2.0 / (n - 1)))
    return bool(np.all(mean_err < Z) and np.all(var_err < Z)), mean_err, var_err


CASES = {
    "ddpm_T1000_small": dict(sampler="ddpm", variance="fixed_small"),
    "ddpm_T1000_large": dict(sampler="ddpm", variance="fixed_large"),
    "ddpm_respaced_50": dict(sampler="ddpm", num_steps=50),
    "ddim_eta0_10": dict(sampler="ddim", num_steps=10, eta=0.0),
    "ddim_eta1_10": dict(sampler="ddim", num_steps=10, eta=1.0),
    "ddim_eta0_25_quadratic": dict(sampler="ddim", num_steps=25, eta=0.0, spacing="quadratic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_reproduces_exact_oracle_moments(case):
    kw = CASES[case]
    sample = dj.make_sampler(oracle_eps, SCHEDULE, clip_denoised=False, **kw)
    x = np.asarray(
        jax.jit(sample, static_argnums=2)(PARAMS, jax.random.key(1), (N, len(MU))), np.float64
    )
    steps = dj.space_timesteps(T, kw.get("num_steps", T), kw.get("spacing", "uniform"))
    kind, eta, variance = kw["sampler"], kw.get("eta", 0.0), kw.get("variance", "fixed_small")
    m, v = exact_moments(steps, kind, eta=eta, variance=variance)
    ok, mean_err, var_err = within_tolerance(x, m, v)
    assert ok, f"{case}: mean z {mean_err}, variance z {var_err}"
    # Power: one wrong coefficient in the same recursion gives moments the test rejects.
    wrong = [exact_moments(steps, kind, eta=eta, variance=variance, eps_scale=1.02)]
    if kind == "ddpm":
        other = "fixed_large" if variance == "fixed_small" else "fixed_small"
        wrong.append(exact_moments(steps, kind, variance=other))
    elif eta > 0:
        wrong.append(exact_moments(steps, kind, eta=eta, var_scale=0.8))
    for wm, wv in wrong:
        assert not within_tolerance(x, wm, wv)[0], f"{case}: a corrupted sampler would pass"


def test_exact_moments_are_not_the_data_moments():
    """The note in the issue: the posterior-variance sampler under-disperses narrow data."""
    m, v = exact_moments(np.arange(T), "ddpm")
    assert v[0] < 0.9 * S[0] ** 2 and v[-1] < 0.9 * S[-1] ** 2
    np.testing.assert_allclose(m, MU, atol=0.02)
    m10, v10 = exact_moments(dj.space_timesteps(T, 10), "ddim")
    assert np.any(np.abs(v10 - S**2) > 0.1 * S**2)  # few-step DDIM has discretisation error


@pytest.mark.parametrize("prediction,fn", [("x0", oracle_x0), ("v", oracle_v)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_x0_and_v_parameterisations_sample_the_same(prediction, fn, sampler):
    shape = (256, len(MU))
    kw = dict(sampler=sampler, num_steps=20, clip_denoised=False)
    ref = dj.make_sampler(oracle_eps, SCHEDULE, **kw)(PARAMS, jax.random.key(3), shape)
    got = dj.make_sampler(fn, SCHEDULE, prediction=prediction, **kw)(
        PARAMS, jax.random.key(3), shape
    )
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


def test_ddim_eta1_on_the_full_schedule_is_the_ancestral_sampler():
    shape = (64, len(MU))
    schedule = dj.make_schedule("linear", 100)
    kw = dict(clip_denoised=False)
    eps_fn = lambda p, x, t: 0.3 * x + p  # any denoiser: the two updates are the same algebra
    ddpm = dj.make_sampler(eps_fn, schedule, sampler="ddpm", **kw)(0.1, jax.random.key(0), shape)
    ddim = dj.make_sampler(eps_fn, schedule, sampler="ddim", eta=1.0, **kw)(
        0.1, jax.random.key(0), shape
    )
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


def small_sampler(**kw):
    schedule = dj.make_schedule("cosine", 50)
    denoise = lambda p, x, t: jnp.tanh(x * p["w"] + t[:, None, None, None] / 50.0)
    return dj.make_sampler(denoise, schedule, **kw), {"w": jnp.float32(0.5)}


def test_sample_is_pure_and_works_under_jit_and_vmap():
    sample, params = small_sampler(sampler="ddpm")
    shape = (2, 4, 4, 1)
    a = sample(params, jax.random.key(0), shape)
    chex.assert_shape(a, shape)
    np.testing.assert_array_equal(a, sample(params, jax.random.key(0), shape))
    assert not np.allclose(a, sample(params, jax.random.key(1), shape))
    np.testing.assert_allclose(
        jax.jit(sample, static_argnums=2)(params, jax.random.key(0), shape), a, atol=1e-6
    )
    # Inside someone else's jit, with the shape closed over.
    outer = jax.jit(lambda p, k: 2.0 * sample(p, k, shape))
    np.testing.assert_allclose(outer(params, jax.random.key(0)), 2 * a, atol=1e-6)
    # vmap over keys: each row equals the unbatched call with that key.
    keys = jax.random.split(jax.random.key(5), 3)
    batched = jax.vmap(lambda k: sample(params, k, shape))(keys)
    chex.assert_shape(batched, (3,) + shape)
    for i in range(3):
        np.testing.assert_allclose(batched[i], sample(params, keys[i], shape), atol=1e-5)
    # vmap over params too.
    ws = {"w": jnp.array([0.1, 0.9], jnp.float32)}
    per_w = jax.vmap(lambda p: sample(p, jax.random.key(0), shape))(ws)
    np.testing.assert_allclose(
        per_w[1], sample({"w": jnp.float32(0.9)}, jax.random.key(0), shape), atol=1e-5
    )
    # Legacy uint32 keys work as well as typed keys.
    chex.assert_shape(sample(params, jax.random.PRNGKey(0), shape), shape)


def test_sampler_traces_once_and_its_program_does_not_grow_with_steps():
    schedule = dj.make_schedule("linear", 1000)

    @chex.assert_max_traces(n=1)
    def denoise(p, x, t):
        return x * p

    sample = jax.jit(dj.make_sampler(denoise, schedule, sampler="ddpm"), static_argnums=2)
    for seed in range(3):
        sample(jnp.float32(0.1), jax.random.key(seed), (2, 3))
    sizes = []
    for steps in (10, 1000):
        fn = dj.make_sampler(lambda p, x, t: x * p, schedule, sampler="ddim", num_steps=steps)
        jaxpr = jax.make_jaxpr(fn, static_argnums=2)(jnp.float32(0.1), jax.random.key(0), (2, 3))
        sizes.append(len(jaxpr.eqns))
        assert sum(e.primitive.name == "scan" for e in jaxpr.eqns) == 1
    assert sizes[0] == sizes[1]


def test_model_kwargs_reach_the_denoiser():
    schedule = dj.make_schedule("linear", 100)
    denoise = lambda p, x, t, y: jnp.zeros_like(x) + y[:, None]
    sample = dj.make_sampler(denoise, schedule, sampler="ddim", num_steps=5, clip_denoised=False)
    a = sample(None, jax.random.key(0), (2, 3), y=jnp.array([0.0, 0.0]))
    b = sample(None, jax.random.key(0), (2, 3), y=jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert not np.allclose(a[1], b[1])


def test_clipping_keeps_samples_in_range():
    sample = dj.make_sampler(oracle_eps, SCHEDULE, sampler="ddpm", num_steps=20, clip_denoised=True)
    far = {"mu": jnp.full((3,), 4.0), "s": jnp.full((3,), 0.5)}
    x = sample(far, jax.random.key(0), (100, 3))
    assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6
    unclipped = dj.make_sampler(
        oracle_eps, SCHEDULE, sampler="ddpm", num_steps=20, clip_denoised=False
    )
    assert float(jnp.mean(unclipped(far, jax.random.key(0), (100, 3)))) > 3.0


def test_trajectory_frames():
    sample, params = small_sampler(sampler="ddpm", trajectory_steps=[49, 25, 0])
    shape = (2, 4, 4, 1)
    x0, frames, preds = sample(params, jax.random.key(0), shape)
    chex.assert_shape([frames, preds], (3,) + shape)
    plain, _ = small_sampler(sampler="ddpm")
    np.testing.assert_allclose(x0, plain(params, jax.random.key(0), shape), atol=1e-6)
    # The first frame is the initial noise; the last step's x0_hat is the output (no noise at t = 0).
    init = jax.random.normal(jax.random.split(jax.random.key(0))[0], shape)
    np.testing.assert_allclose(frames[0], init, atol=1e-6)
    np.testing.assert_allclose(preds[2], x0, atol=1e-6)
    with pytest.raises(ValueError, match="trajectory_steps"):
        small_sampler(trajectory_steps=[50])


def test_learned_range_variance_interpolates_the_logs():
    schedule = dj.make_schedule("linear", 100)
    x = jnp.ones((3, 2))
    t = jnp.array([1, 50, 99])
    for v, expected in (
        (1.0, np.log(schedule.betas[t])),
        (-1.0, schedule.posterior_log_variance_clipped[t]),
    ):
        out = jnp.concatenate([jnp.zeros_like(x), jnp.full_like(x, v)], axis=-1)
        mv = sampling.p_mean_variance(schedule, out, x, t, variance="learned_range")
        np.testing.assert_allclose(
            mv.log_variance, np.broadcast_to(np.asarray(expected)[:, None], (3, 2)), rtol=1e-5
        )
    out = jnp.zeros((3, 4))
    mid = sampling.p_mean_variance(schedule, out, x, t, variance="learned_range").log_variance
    expected_mid = 0.5 * (
        np.log(schedule.betas[t]) + np.asarray(schedule.posterior_log_variance_clipped[t])
    )
    np.testing.assert_allclose(mid[:, 0], expected_mid, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    schedule = dj.make_schedule("linear", 100)
    f = lambda p, x, t: x
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'"):
        dj.make_sampler(f, schedule, sampler="euler_a")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        dj.make_sampler(f, schedule, sampler="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="unknown variance"):
        dj.make_sampler(f, schedule, variance="big")
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 100\]"):
        dj.make_sampler(f, schedule, num_steps=200)
    with pytest.raises(ValueError, match="learned_range variance needs a model output"):
        dj.make_sampler(f, schedule, variance="learned_range")(None, jax.random.key(0), (2, 3))
    with pytest.raises(ValueError, match="must equal the sample shape"):
        dj.make_sampler(lambda p, x, t: x[:, :2], schedule)(None, jax.random.key(0), (2, 3))
    with pytest.raises(ValueError, match="at least 2 axes"):
        dj.make_sampler(f, schedule)(None, jax.random.key(0), (3,))


def test_unet_and_mlp_plug_into_the_sampler():
    """The networks are denoisers like any other: a class-conditional U-Net with learned variance
    and the MLP, sampled under jit, with labels passed through ``model_kwargs``."""
    from diffusion_jax.models import MLPDenoiser, UNet

    schedule = dj.make_schedule("cosine", 100)
    unet = UNet(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        num_classes=3,
        learn_sigma=True,
    )
    x = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(unet.init)(
        jax.random.key(0), x, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    )["params"]
    params = jax.tree.map(lambda p: p + 0.01, params)  # leave the zero-initialised output layers
    denoise = lambda p, x, t, y: unet.apply({"params": p}, x, t, y)
    sample = dj.make_sampler(
        denoise, schedule, sampler="ddpm", num_steps=5, variance="learned_range"
    )
    out = jax.jit(sample, static_argnums=2)(
        params, jax.random.key(1), (2, 8, 8, 1), y=jnp.array([0, 2])
    )
    chex.assert_shape(out, (2, 8, 8, 1))
    assert np.all(np.isfinite(out)) and float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
    mlp = MLPDenoiser(hidden=16, num_layers=1)
    mlp_params = mlp.init(jax.random.key(0), jnp.zeros((2, 2)), jnp.zeros((2,), jnp.int32))[
        "params"
    ]
    mlp_sample = dj.make_sampler(
        lambda p, x, t: mlp.apply({"params": p}, x, t), schedule, sampler="ddim", num_steps=5
    )
    chex.assert_shape(mlp_sample(mlp_params, jax.random.key(0), (7, 2)), (7, 2))
