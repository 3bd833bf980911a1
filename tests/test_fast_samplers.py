"""ODE samplers, learned variance, guidance and editing against analytic oracles.

Gaussian data x_0 ~ N(mu, diag(s^2)) has a linear optimal denoiser, so a deterministic sampler
driven by it is an affine map x_T -> a x_T + b per dimension. The references below implement each
sampler from its paper in float64 numpy (Karras et al. 2022 Algorithms 1-2 in y = x_0 + sigma eps;
Lu et al. 2022 DPM-Solver++(2M) in alpha, sigma, lambda) and recover (a, b) by evaluating at 0 and 1.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj

T = 1000
SCHEDULE = dj.make_schedule("linear", T)
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
MU = np.array([0.5, -1.0, 0.0, 0.3])
S = np.array([0.05, 0.2, 1.0, 0.5])
PARAMS = {"mu": jnp.asarray(MU, jnp.float32), "s": jnp.asarray(S, jnp.float32)}


def oracle_eps(params, x_t, t):
    abar = SCHEDULE.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    mu, s = params["mu"], params["s"]
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)


def np_x0(x, ab):
    """E[x_0 | x_t] for the Gaussian data, float64."""
    return MU + np.sqrt(ab) * S**2 * (x - np.sqrt(ab) * MU) / (ab * S**2 + 1 - ab)


def reference_sampler(name, steps, x_T):
    """The paper's sampler on the kept ``steps`` (increasing), from x_T [D], in float64."""
    abar = np.r_[1.0, ABAR[np.asarray(steps)]]  # abar[0] = 1: the clean end of the chain
    x = np.asarray(x_T, np.float64)
    if name in ("euler", "heun"):
        sig = np.sqrt(
            (1 - abar) / abar
        )  # Karras noise levels; y = x / sqrt(abar) = x_0 + sigma eps
        y = x / np.sqrt(abar[-1])
        denoise = lambda y, k: np_x0(np.sqrt(abar[k]) * y, abar[k])
        for k in range(len(steps), 0, -1):
            d = (y - denoise(y, k)) / sig[k]
            y_next = y + (sig[k - 1] - sig[k]) * d
            if name == "heun" and sig[k - 1] > 0:
                d2 = (y_next - denoise(y_next, k - 1)) / sig[k - 1]
                y_next = y + (sig[k - 1] - sig[k]) * (d + d2) / 2
            y = y_next
        return y
    # DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, with a first-order final step to sigma = 0.
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha[1:] / sigma[1:])
    x0_prev, h_prev = None, None
    for k in range(len(steps), 0, -1):
        x0 = np_x0(x, abar[k])
        if k == 1:
            return x0  # the last step lands on alpha = 1, sigma = 0: x = D = x0_hat
        h = lam[k - 2] - lam[k - 1]
        if x0_prev is None:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma[k - 1] / sigma[k] * x - alpha[k - 1] * (np.exp(-h) - 1) * D
        x0_prev, h_prev = x0, h
    return x


def affine_map(name, steps):
    b = reference_sampler(name, steps, np.zeros_like(MU))
    return reference_sampler(name, steps, np.ones_like(MU)) - b, b


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_solver_2m"])
@pytest.mark.parametrize("num_steps", [5, 20])
def test_ode_samplers_match_their_reference_pointwise(name, num_steps):
    sample = dj.make_sampler(
        oracle_eps, SCHEDULE, sampler=name, num_steps=num_steps, clip_denoised=False,
        trajectory_steps=[num_steps - 1],
    )  # fmt: skip
    out, frames, _ = jax.jit(sample, static_argnums=2)(PARAMS, jax.random.key(0), (512, len(MU)))
    a, b = affine_map(name, dj.karras_timesteps(SCHEDULE, num_steps))
    expected = a * np.asarray(frames[0], np.float64) + b  # frames[0] is the starting noise x_T
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # Deterministic: the output depends on the key only through x_T.
    again, frames2, _ = sample(PARAMS, jax.random.key(0), (512, len(MU)))
    np.testing.assert_allclose(again, out, atol=1e-6)
    # Moments: exactly b and a^2, so the empirical ones agree within statistical error.
    n = out.shape[0]
    assert np.all(np.abs(np.asarray(out).mean(0) - b) < 5 * np.abs(a) / np.sqrt(n))


def test_euler_is_ddim_eta0_on_the_same_steps():
    kw = dict(num_steps=12, spacing="karras", clip_denoised=False)
    euler = dj.make_sampler(oracle_eps, SCHEDULE, sampler="euler", **kw)(
        PARAMS, jax.random.key(1), (64, 4)
    )
    ddim = dj.make_sampler(oracle_eps, SCHEDULE, sampler="ddim", **kw)(
        PARAMS, jax.random.key(1), (64, 4)
    )
    np.testing.assert_allclose(euler, ddim, rtol=1e-4, atol=1e-4)


def test_ode_samplers_converge_to_the_data_and_heun_is_faster():
    """Distance of the exact output moments (b, a^2) to the data's (mu, s^2) as steps grow.

    Only the dimensions with s well above the smallest noise level (sigma_0 = 0.01) are compared:
    the final step from sigma_0 to 0 is an Euler step in every sampler (Karras et al.), which
    shrinks the variance of very narrow data by s^2 / (s^2 + sigma_0^2), whatever the step count.
    """
    wide = S >= 0.2

    def error(name, n):
        a, b = affine_map(name, dj.karras_timesteps(SCHEDULE, n))
        return np.sum((np.abs(b - MU) / S + np.abs(a * a / S**2 - 1))[wide])

    for name in ("euler", "heun", "dpm_solver_2m"):
        errs = [error(name, n) for n in (20, 40, 80)]
        assert errs[0] > errs[1] > errs[2], (name, errs)
    for n in (20, 40, 80):
        assert error("heun", n) < 0.5 * error("euler", n)
        assert error("dpm_solver_2m", n) < 0.5 * error("euler", n)
    # Orders of convergence: about first for Euler (halving the step halves the error), about
    # second for Heun (a quarter).
    assert 1.6 < error("euler", 40) / error("euler", 80) < 2.6
    assert error("heun", 40) / error("heun", 80) > 3.0


# ----------------------------------------------------------------------------- learned variance


def test_learned_variance_optimum_is_the_analytic_one():
    """For the optimal mean, E[L_t] is minimised at Sigma* = beta-tilde_t + c1_t^2 Var[x_0 | x_t]."""
    s = 0.5
    n = 20_000
    x0 = s * jax.random.normal(jax.random.key(0), (n, 1))
    for t_idx in (30, 300):
        ab, ab_prev = ABAR[t_idx], ABAR[t_idx - 1]
        beta = 1 - ab / ab_prev
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        c1 = beta * np.sqrt(ab_prev) / (1 - ab)
        var_x0 = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
        v_star = (
            2
            * (np.log(beta_tilde + c1**2 * var_x0) - np.log(beta_tilde))
            / (np.log(beta) - np.log(beta_tilde))
            - 1
        )
        assert -1 < v_star < 1

        def mean_loss(v, t_idx=t_idx):
            def model_fn(x_t, t):
                eps = oracle_eps({"mu": jnp.zeros(1), "s": jnp.full(1, s)}, x_t, t)
                return jnp.concatenate([eps, jnp.full_like(eps, v)], -1)

            t = jnp.full((n,), t_idx)
            loss = dj.hybrid_loss(SCHEDULE, model_fn, x0, jax.random.key(1), t=t, lambda_vlb=1.0)
            return float(jnp.mean(loss))

        grid = np.linspace(-1, 1, 41)
        losses = np.array([mean_loss(v) for v in grid])
        assert abs(grid[np.argmin(losses)] - v_star) <= 0.1, (
            t_idx,
            grid[np.argmin(losses)],
            v_star,
        )


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
    x0 = jax.random.uniform(jax.random.key(0), (8, 4, 4, 2), minval=-1, maxval=1)

    def model_fn(w):
        return lambda x_t, t: jnp.concatenate([w["mean"] * x_t, w["var"] * jnp.ones_like(x_t)], -1)

    w = {"mean": jnp.float32(0.3), "var": jnp.float32(0.2)}
    hybrid = lambda w: jnp.mean(
        dj.hybrid_loss(SCHEDULE, model_fn(w), x0, jax.random.key(1), lambda_vlb=10.0)
    )
    simple = lambda w: jnp.mean(
        dj.diffusion_loss(SCHEDULE, lambda x, t: model_fn(w)(x, t)[..., :2], x0, jax.random.key(1))
    )
    g_h, g_s = jax.grad(hybrid)(w), jax.grad(simple)(w)
    np.testing.assert_allclose(g_h["mean"], g_s["mean"], rtol=1e-5)
    assert abs(float(g_h["var"])) > 0  # the variance does learn from L_vlb
    with pytest.raises(ValueError, match="learned-variance model output"):
        dj.hybrid_loss(SCHEDULE, lambda x, t: x, x0, jax.random.key(0))


def test_ddpm_with_learned_variance_matches_its_oracle_moments():
    """v = +1 is beta_t and v = -1 is beta-tilde_t: sampling with them equals fixed_large / fixed_small."""
    shape = (256, 4)
    for v, fixed in ((1.0, "fixed_large"), (-1.0, "fixed_small")):
        learned = lambda p, x, t, v=v: jnp.concatenate(
            [oracle_eps(p, x, t), jnp.full_like(x, v)], -1
        )
        kw = dict(sampler="ddpm", num_steps=50, clip_denoised=False)
        a = dj.make_sampler(learned, SCHEDULE, variance="learned_range", **kw)(
            PARAMS, jax.random.key(0), shape
        )
        b = dj.make_sampler(oracle_eps, SCHEDULE, variance=fixed, **kw)(
            PARAMS, jax.random.key(0), shape
        )
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- guidance

CENTERS = jnp.array([-1.0, 1.0])
WIDTH = 0.1


def mixture_eps(params, x_t, t, y):
    """Optimal eps for a two-class mixture of N(+-1, 0.1^2) in 1-D; y = 2 is the null label."""
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    var = abar * WIDTH**2 + 1 - abar
    comp = jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * CENTERS) / var  # [B, 2]: eps per component
    log_lik = -0.5 * (x_t - jnp.sqrt(abar) * CENTERS) ** 2 / var
    post = jax.nn.softmax(log_lik, axis=-1)
    uncond = jnp.sum(post * comp, axis=-1, keepdims=True)
    cond = jnp.take_along_axis(comp, jnp.clip(y, 0, 1)[:, None], axis=-1)
    return jnp.where((y == 2)[:, None], uncond, cond)


def mixture_logits(params, x_t, t):
    """The exact noisy classifier log p(y | x_t) (up to a constant) for the mixture."""
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    return -0.5 * (x_t - jnp.sqrt(abar) * CENTERS) ** 2 / (abar * WIDTH**2 + 1 - abar)


def test_classifier_free_guidance_scales_0_and_1_are_exact():
    guided = dj.classifier_free_guidance(mixture_eps, null_label=2)
    x = jax.random.normal(jax.random.key(0), (16, 1))
    t = jnp.full((16,), 500)
    y = jnp.ones((16,), jnp.int32)
    np.testing.assert_array_equal(
        guided(None, x, t, y=y, guidance_scale=0.0), mixture_eps(None, x, t, jnp.full_like(y, 2))
    )
    np.testing.assert_array_equal(
        guided(None, x, t, y=y, guidance_scale=1.0), mixture_eps(None, x, t, y)
    )
    calls = []
    counting = lambda p, x, t, y: calls.append(x.shape) or mixture_eps(p, x, t, y)
    dj.classifier_free_guidance(counting, 2)(None, x, t, y=y, guidance_scale=3.0)
    assert calls == [(32, 1)]  # both evaluations in one batched call


def test_guidance_moves_samples_toward_the_asked_class():
    shape = (2000, 1)
    y = jnp.ones((2000,), jnp.int32)
    guided = dj.classifier_free_guidance(mixture_eps, null_label=2)
    sample = jax.jit(
        dj.make_sampler(guided, SCHEDULE, sampler="ddim", num_steps=50, clip_denoised=False),
        static_argnums=2,
    )
    frac = {
        w: float(jnp.mean(sample(None, jax.random.key(0), shape, y=y, guidance_scale=w) > 0))
        for w in (0.0, 1.0, 3.0)
    }
    assert 0.4 < frac[0.0] < 0.6  # unconditional: half of each class
    assert frac[1.0] > 0.99 and frac[3.0] > 0.99
    # Classifier guidance at scale 1 with the exact noisy classifier turns the unconditional
    # denoiser into the conditional one: samples follow class 1's N(1, 0.1^2).
    uncond = lambda p, x, t, y: mixture_eps(p, x, t, jnp.full_like(y, 2))
    for name in ("ddpm", "ddim"):
        cg = dj.make_sampler(
            uncond, SCHEDULE, sampler=name, num_steps=200, clip_denoised=False,
            cond_fn=dj.classifier_guidance(mixture_logits, scale=1.0),
        )  # fmt: skip
        x = np.asarray(jax.jit(cg, static_argnums=2)(None, jax.random.key(1), shape, y=y))
        assert np.mean(x > 0) > 0.99, name
        assert abs(x.mean() - 1.0) < 0.03 and 0.07 < x.std() < 0.13, (name, x.mean(), x.std())


# ----------------------------------------------------------------------------- editing


def test_inpainting_keeps_the_known_region():
    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
    mask = jnp.zeros((1, 8, 8, 1)).at[:, :, :4].set(1.0)  # left half known
    params = {"mu": jnp.zeros(1), "s": jnp.full(1, 0.5)}
    for resample in (1, 3):
        inpaint = dj.make_inpainter(oracle_eps, SCHEDULE, num_steps=20, resample=resample)
        out = jax.jit(inpaint)(params, jax.random.key(1), images, mask)
        np.testing.assert_array_equal(out[:, :, :4], images[:, :, :4])
        assert np.all(np.isfinite(out)) and not np.allclose(out[:, :, 4:], images[:, :, 4:])
        other = inpaint(params, jax.random.key(2), images, mask)
        assert not np.allclose(other[:, :, 4:], out[:, :, 4:])
    with pytest.raises(ValueError, match="resample must be an integer >= 1"):
        dj.make_inpainter(oracle_eps, SCHEDULE, resample=0)


def test_repaint_resamples_every_step_but_the_last():
    """RePaint with jump length 1: each of the first S - 1 steps runs ``resample`` times, the last
    (onto the clean image) once; it used to be repeated on its own output (issue 22)."""
    calls = []

    def counting_eps(params, x, t):
        jax.debug.callback(lambda t: calls.append(int(np.asarray(t).ravel()[0])), t)
        return jnp.zeros_like(x)

    images = jnp.zeros((2, 4, 4, 1))
    mask = jnp.zeros((1, 4, 4, 1)).at[:, :, :2].set(1.0)
    levels = dj.sampling_levels(dj.make_process("vp", schedule=SCHEDULE), 5, "uniform")
    inpaint = dj.make_inpainter(counting_eps, SCHEDULE, sampler="ddim", num_steps=5, resample=3)
    jax.block_until_ready(jax.jit(inpaint)(None, jax.random.key(0), images, mask))
    jax.effects_barrier()
    expected = [int(t) for t in levels.model_t[::-1] for _ in range(3)][:-2]
    assert calls == expected, calls


def test_img2img_strength():
    # Images from the data distribution: a light edit stays near them, a full one is a new sample.
    images = PARAMS["mu"] + PARAMS["s"] * jax.random.normal(jax.random.key(0), (512, 4))
    zero = dj.make_img2img(oracle_eps, SCHEDULE, strength=0.0, num_steps=50)
    np.testing.assert_array_equal(zero(PARAMS, jax.random.key(1), images), images)
    dist = {}
    for strength in (0.1, 1.0):
        edit = dj.make_img2img(
            oracle_eps, SCHEDULE, strength=strength, num_steps=50, clip_denoised=False
        )
        dist[strength] = (
            np.mean((edit(PARAMS, jax.random.key(1), images) - images) ** 2, axis=0) / S**2
        )
    # On the dimensions whose width is well above the noise at strength 0.1 (std ~0.26); narrower
    # ones are resampled at any strength, and the 50-step sampler under-disperses them.
    wide = S >= 0.5
    assert np.all(dist[0.1][wide] < 0.25 * dist[1.0][wide]), dist
    np.testing.assert_allclose(
        dist[1.0][wide], 2.0, rtol=0.2
    )  # independent draws: E|x - x'|^2 = 2 s^2
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        dj.make_img2img(oracle_eps, SCHEDULE, strength=1.5)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpm_solver_2m"])
def test_every_sampler_traces_once_and_runs_under_vmap_too(name):  # no "vmap." in the name: chex
    sample = dj.make_sampler(oracle_eps, SCHEDULE, sampler=name, num_steps=8)
    chex.clear_trace_counter()  # the counter is per code object, shared across parametrisations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, key):
        return sample(params, key, (3, 4))

    a = run(PARAMS, jax.random.key(0))
    run(PARAMS, jax.random.key(1))
    np.testing.assert_allclose(a, sample(PARAMS, jax.random.key(0), (3, 4)), atol=1e-5)
    batched = jax.vmap(lambda k: sample(PARAMS, k, (3, 4)))(jax.random.split(jax.random.key(0), 2))
    chex.assert_shape(batched, (2, 3, 4))
