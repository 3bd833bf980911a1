"""Schedules against independent float64 computations and each schedule's defining property."""

import math

import jax
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax.schedules import SCHEDULE_NAMES, SPACINGS


def reference_coefficients(betas):
    """Every coefficient by the textbook definitions, one element at a time, in float64."""
    betas = [float(b) for b in betas]
    out = {k: [] for k in ("alphas_cumprod", "alphas_cumprod_prev", "posterior_variance")}
    out.update({k: [] for k in ("coef1", "coef2", "snr")})
    prod = 1.0
    for beta in betas:
        prev = prod
        prod *= 1.0 - beta
        out["alphas_cumprod"].append(prod)
        out["alphas_cumprod_prev"].append(prev)
        out["posterior_variance"].append((1 - prev) / (1 - prod) * beta)
        out["coef1"].append(math.sqrt(prev) * beta / (1 - prod))
        out["coef2"].append(math.sqrt(1 - beta) * (1 - prev) / (1 - prod))
        out["snr"].append(prod / (1 - prod))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("num_timesteps", [50, 1000])
def test_coefficients_match_float64_reference(name, num_timesteps):
    sched = dj.make_schedule(name, num_timesteps)
    # The betas themselves are checked against their formulas below; here every derived coefficient
    # is recomputed from the float64 betas and compared with the float32 storage.
    ref = reference_coefficients(dj.betas_for_schedule(name, num_timesteps))
    rtol = 1e-6
    np.testing.assert_allclose(sched.alphas_cumprod, ref["alphas_cumprod"], rtol=rtol)
    np.testing.assert_allclose(sched.alphas_cumprod_prev, ref["alphas_cumprod_prev"], rtol=rtol)
    np.testing.assert_allclose(
        sched.alphas, 1 - dj.betas_for_schedule(name, num_timesteps), rtol=1e-7
    )
    np.testing.assert_allclose(sched.sqrt_alphas_cumprod, np.sqrt(ref["alphas_cumprod"]), rtol=rtol)
    np.testing.assert_allclose(
        sched.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ref["alphas_cumprod"]), rtol=rtol
    )
    np.testing.assert_allclose(
        sched.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ref["alphas_cumprod"] - 1), rtol=rtol
    )
    np.testing.assert_allclose(sched.posterior_variance, ref["posterior_variance"], rtol=rtol)
    np.testing.assert_allclose(sched.posterior_mean_coef1, ref["coef1"], rtol=rtol)
    np.testing.assert_allclose(sched.posterior_mean_coef2, ref["coef2"], rtol=rtol)
    np.testing.assert_allclose(sched.snr, ref["snr"], rtol=rtol)
    # Clipped log: log beta-tilde_t for t >= 1, and beta-tilde_1 in place of the zero at t = 0.
    np.testing.assert_allclose(
        sched.posterior_log_variance_clipped,
        np.log(np.r_[ref["posterior_variance"][1], ref["posterior_variance"][1:]]),
        rtol=1e-6,
    )
    assert sched.posterior_variance[0] == 0.0
    for leaf in jax.tree_util.tree_leaves(sched):
        assert leaf.shape == (num_timesteps,)
    assert sched.betas.dtype == np.float32 and sched.model_timesteps.dtype == np.int32


def test_linear_is_ddpm_and_rescales_with_T():
    sched = dj.make_schedule("linear", 1000)
    np.testing.assert_allclose(sched.betas[np.array([0, -1])], [1e-4, 0.02], rtol=1e-6)
    assert np.all(np.diff(np.asarray(sched.betas, np.float64)) > 0)
    # improved-DDPM: endpoints scale by 1000/T, so T=250 runs from 4e-4 to 0.08.
    np.testing.assert_allclose(
        dj.make_schedule("linear", 250).betas[np.array([0, -1])], [4e-4, 0.08], rtol=1e-6
    )


def test_cosine_follows_its_formula():
    T, s = 1000, 0.008
    sched = dj.make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    betas = np.asarray(sched.betas, np.float64)
    # Up to the clip at 0.999 (only the last steps), alpha-bar_t = f(t)/f(0) in the paper's 1-based t.
    unclipped = betas < 0.999 - 1e-6
    assert unclipped[:-1].all() and not unclipped[-1]
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[:-1], expected[:-1], rtol=1e-5)
    np.testing.assert_allclose(betas[-1], 0.999, rtol=1e-6)


def test_quadratic_sigmoid_geometric_properties():
    for name in ("quadratic", "sigmoid", "geometric"):
        betas = np.asarray(dj.make_schedule(name, 1000).betas, np.float64)
        assert np.all(np.diff(betas) > 0), name
        assert 1e-4 * 0.999 <= betas[0] and betas[-1] <= 0.02 * 1.001, name
    quad = np.asarray(dj.make_schedule("quadratic", 1000).betas, np.float64)
    np.testing.assert_allclose(np.diff(np.sqrt(quad)), np.diff(np.sqrt(quad))[0], rtol=1e-3)
    np.testing.assert_allclose(quad[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    geo = np.asarray(dj.make_schedule("geometric", 1000).betas, np.float64)
    np.testing.assert_allclose(geo[1:] / geo[:-1], (0.02 / 1e-4) ** (1 / 999), rtol=1e-5)
    sig = np.asarray(dj.make_schedule("sigmoid", 1000).betas, np.float64)
    z = np.linspace(-6, 6, 1000)
    np.testing.assert_allclose(sig, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-z)), rtol=1e-6)


def test_user_betas_and_errors():
    sched = dj.make_schedule(betas=[0.1, 0.2, 0.3])
    assert sched.num_timesteps == 3
    np.testing.assert_allclose(sched.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
    assert dj.make_schedule(betas=[0.5]).num_timesteps == 1
    with pytest.raises(ValueError, match="num_timesteps must be >= 1"):
        dj.make_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        dj.make_schedule(betas=[0.1, 1.0])
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        dj.make_schedule(betas=[0.0, 0.1])
    with pytest.raises(ValueError, match="1-D array"):
        dj.make_schedule(betas=np.full((2, 2), 0.1))
    with pytest.raises(ValueError, match="empty"):
        dj.make_schedule(betas=[])
    with pytest.raises(ValueError, match="non-finite"):
        dj.make_schedule(betas=[0.1, float("nan")])
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        dj.make_schedule("cosin", 10)
    with pytest.raises(ValueError, match="T must be >= 21"):
        dj.make_schedule("linear", 10)
    with pytest.raises(ValueError, match="integer"):
        dj.make_schedule("linear", 10.5)
    with pytest.raises(ValueError, match="only apply to named"):
        dj.make_schedule(betas=[0.1], beta_start=0.1)
    with pytest.raises(ValueError, match="do not apply to the cosine schedule"):
        dj.make_schedule("cosine", 100, beta_end=0.02)  # was silently ignored (issue 22)


def test_schedule_is_a_jit_argument():
    sched = dj.make_schedule("linear", 100)
    f = jax.jit(lambda s, i: s.alphas_cumprod[i])
    np.testing.assert_allclose(f(sched, 3), sched.alphas_cumprod[3])
    np.testing.assert_allclose(
        f(dj.make_schedule("cosine", 100), 3), dj.make_schedule("cosine", 100).alphas_cumprod[3]
    )


@pytest.mark.parametrize("spacing", SPACINGS)
def test_space_timesteps(spacing):
    for T, n in [(1000, 10), (1000, 50), (100, 100)]:
        steps = dj.space_timesteps(T, n, spacing)
        assert steps.shape == (n,) and np.all(np.diff(steps) > 0)
        assert steps[0] >= 0 and steps[-1] <= T - 1
        if spacing != "leading":
            assert steps[-1] == T - 1  # the noisiest step is kept
    np.testing.assert_array_equal(dj.space_timesteps(1000, 10, "leading"), np.arange(0, 1000, 100))
    np.testing.assert_array_equal(
        dj.space_timesteps(1000, 10, "trailing"), np.arange(99, 1000, 100)
    )
    np.testing.assert_array_equal(dj.space_timesteps(10, 4, "uniform"), [0, 3, 6, 9])
    np.testing.assert_array_equal(dj.space_timesteps(10, 4, "quadratic"), [0, 1, 4, 9])
    np.testing.assert_array_equal(dj.space_timesteps(1000, 1), [999])
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 10\]"):
        dj.space_timesteps(10, 11)
    with pytest.raises(ValueError, match="unknown spacing"):
        dj.space_timesteps(10, 5, "even")


def test_respace_keeps_alpha_bar_at_kept_steps():
    sched = dj.make_schedule("cosine", 1000)
    steps = dj.space_timesteps(1000, 25)
    sub = dj.respace(sched, steps)
    assert sub.num_timesteps == 25
    np.testing.assert_array_equal(sub.model_timesteps, steps)
    np.testing.assert_allclose(
        sub.alphas_cumprod, np.asarray(sched.alphas_cumprod)[steps], rtol=1e-5
    )
    # Respacing twice composes: the network still sees the original timesteps.
    subsub = dj.respace(sub, [0, 12, 24])
    np.testing.assert_array_equal(subsub.model_timesteps, steps[[0, 12, 24]])
    np.testing.assert_allclose(
        subsub.alphas_cumprod, np.asarray(sched.alphas_cumprod)[steps[[0, 12, 24]]], rtol=1e-5
    )
    with pytest.raises(ValueError, match="strictly increasing"):
        dj.respace(sched, [5, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        dj.respace(sched, [0, 1000])
