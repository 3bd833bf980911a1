"""The noise-process core against closed forms: VP (discrete and continuous), flow and EDM processes,
the (x_0, eps) <-> output conversions, the losses and time samplers on them, and every sampler on every
process driven by the exact denoiser of Gaussian data.

Gaussian data x_0 ~ N(mu, diag(s^2)) gives x_t = alpha x_0 + sigma eps ~ N(alpha mu, alpha^2 s^2 +
sigma^2) and the posterior means (the oracle every sampler below is driven by)

    E[x_0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2),
    E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).

Its probability-flow ODE maps quantiles to quantiles: x_0 = mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2
s^2 + sigma_T^2). References are float64 numpy, written from the papers, never from the library.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import diffusion_jax as dj
from diffusion_jax.forward import OBJECTIVES, x0_sensitivity
from diffusion_jax.processes import sample_training_times
from diffusion_jax.sampling import ODE_SAMPLERS, SAMPLERS

T = 1000
LINEAR = dj.make_schedule("linear", T)
PROCESSES = {
    "vp": dj.make_process("vp", schedule=LINEAR),  # DDPM's T-step process
    "vp_continuous": dj.make_process("vp", schedule=LINEAR, discrete=False),
    "flow": dj.make_process("flow"),
    "edm": dj.make_process("edm"),
}
MU = np.array([0.5, -1.0])
S = np.array([0.3, 1.0])
PARAMS = {"mu": jnp.asarray(MU, jnp.float32), "s": jnp.asarray(S, jnp.float32)}
SIGMA_DATA = 0.5  # the processes' default


def linear_alpha_bar(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule (Ho et al. sec. 4): betas 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T."""
    scale = 1000.0 / num_timesteps
    return np.cumprod(1.0 - np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps))


def cosine_alpha_bar(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal eq. 17, betas clipped at 0.999."""
    f = np.cos((np.arange(num_timesteps + 1) / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas)


ABAR_T = linear_alpha_bar(T)[-1]
# The first (noisiest) level of every sampler below is the process's t = 1, and x_T ~ N(0, std^2).
FIRST_LEVEL = {  # (alpha_T, sigma_T, prior std)
    "vp": (math.sqrt(ABAR_T), math.sqrt(1 - ABAR_T), 1.0),
    "vp_continuous": (math.sqrt(ABAR_T), math.sqrt(1 - ABAR_T), 1.0),
    "flow": (0.0, 1.0, 1.0),
    "edm": (1.0, 80.0, 80.0),
}


def posterior_np(x, alpha, sigma, mu=MU):
    """(E[x_0 | x_t], E[eps | x_t]) of the Gaussian data, float64."""
    var = alpha**2 * S**2 + sigma**2
    return mu + alpha * S**2 * (x - alpha * mu) / var, sigma * (x - alpha * mu) / var


def gaussian_oracle(process, prediction):
    """The exact denoiser of the Gaussian data as a network: ``(params, x_in, model_t, y=None)``.

    It reads its noise level back from the network time, undoes the input scaling the chain applies
    (EDM's c_in / alpha for prediction 'edm', 1 / sqrt(alpha^2 + sigma^2) for other predictions on
    the edm process: Karras et al. Table 1 and its VP image) and returns the posterior means in the
    ``prediction`` parameterisation. ``y`` (class labels) picks rows of ``params["mu"]`` [K, D].
    """

    def denoise(params, x_in, model_t, y=None):
        mu = params["mu"] if y is None else params["mu"][y]
        s = params["s"]
        alpha, sigma = process.alpha_sigma(process.t_from_model_time(model_t))
        alpha, sigma = alpha[:, None], sigma[:, None]
        if prediction == "edm":
            x = x_in * jnp.sqrt(sigma**2 + (alpha * process.sigma_data) ** 2)
        elif process.kind == "edm":
            x = x_in * jnp.sqrt(alpha**2 + sigma**2)
        else:
            x = x_in
        var = alpha**2 * s**2 + sigma**2
        x0 = mu + alpha * s**2 * (x - alpha * mu) / var
        eps = sigma * (x - alpha * mu) / var
        return dj.output_target(x0, eps, alpha, sigma, prediction, process.sigma_data)

    return denoise


def ode_reference(x_T, alpha_T, sigma_T, substeps=2000):
    """x_0 from x_T at (alpha_T, sigma_T) along the probability-flow ODE, float64 RK4.

    The ODE is dy/ds = E[eps | x] in y = x / alpha, s = sigma / alpha (Karras et al. 2022 eq. 4). It is
    integrated in the bounded variables phi = arctan(s) in [0, pi/2] and w = y cos(phi) = x / sqrt(alpha^2
    + sigma^2), where it reads dw/dphi = cos(phi) eps_hat - sin(phi) x0_hat, with the posterior means
    taken at (alpha, sigma) = (cos phi, sin phi): the same ODE (dy/dphi = eps_hat ds/dphi), finite at
    flow's t = 1 where alpha = 0 and s is infinite.
    """
    w = np.asarray(x_T, np.float64) / math.hypot(alpha_T, sigma_T)
    phi = np.linspace(math.atan2(sigma_T, alpha_T), 0.0, substeps + 1)

    def f(w, p):
        x0, eps = posterior_np(w, math.cos(p), math.sin(p))
        return math.cos(p) * eps - math.sin(p) * x0

    for p, q in zip(phi[:-1], phi[1:], strict=True):
        h = q - p
        k1 = f(w, p)
        k2 = f(w + 0.5 * h * k1, p + 0.5 * h)
        k3 = f(w + 0.5 * h * k2, p + 0.5 * h)
        k4 = f(w + h * k3, q)
        w = w + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return w  # phi = 0: alpha = 1, sigma = 0, so w = x_0


def quantile_map(x_T, alpha_T, sigma_T):
    """The exact ODE solution: x_T's quantile under N(alpha_T mu, alpha_T^2 s^2 + sigma_T^2), in the data."""
    return MU + S * (x_T - alpha_T * MU) / np.sqrt(alpha_T**2 * S**2 + sigma_T**2)


# ================================================================ 1. process maths


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vp_process_is_the_schedule_at_its_nodes(name):
    """alpha(t_k)^2 = alpha-bar_k at t_k = (k + 1) / T (float32, as stored), alpha^2 + sigma^2 = 1."""
    schedule = dj.make_schedule(name, T)
    abar_ref = linear_alpha_bar(T) if name == "linear" else cosine_alpha_bar(T)
    abar32 = np.asarray(schedule.alphas_cumprod)
    np.testing.assert_allclose(abar32, abar_ref, rtol=2e-6)
    for discrete in (True, False):
        process = dj.make_process("vp", schedule=schedule, discrete=discrete)
        t = jnp.arange(1, T + 1, dtype=jnp.float32) / T
        alpha, sigma = jax.jit(lambda p, t: p.alpha_sigma(t))(process, t)
        alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
        np.testing.assert_allclose(alpha**2, abar32, rtol=1e-6)
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
        # sigma^2 = 1 - alpha-bar to float32 precision even where it is tiny (t near 0).
        np.testing.assert_allclose(sigma**2, 1.0 - abar32.astype(np.float64), rtol=1e-5)
        # float64 numpy: at the nodes (to the float32 rounding of the stored log alpha-bar), log
        # alpha-bar linear between them, clean at t = 0.
        t64 = np.arange(T + 1) / T
        a64, s64 = process.alpha_sigma(t64, np)
        np.testing.assert_allclose(a64[1:] ** 2, abar32, rtol=1e-6)
        np.testing.assert_allclose(a64**2 + s64**2, 1.0, atol=1e-12)
        assert a64[0] == 1.0 and s64[0] == 0.0
        mid, _ = process.alpha_sigma((t64[1:-1] + t64[2:]) / 2, np)
        nodes = 2 * np.log(a64[1:])  # the stored log alpha-bar, read back at the nodes
        np.testing.assert_allclose(2 * np.log(mid), 0.5 * (nodes[:-1] + nodes[1:]), rtol=1e-10)


EDM_VARIANT = dj.make_process("edm", sigma_min=0.01, sigma_max=50.0, rho=5.0, sigma_data=1.3)
COSINE_VP = dj.make_process("vp", schedule=dj.make_schedule("cosine", T), discrete=False)
ALL_KINDS = {**PROCESSES, "edm_variant": EDM_VARIANT, "vp_cosine": COSINE_VP}


@pytest.mark.parametrize("name", list(ALL_KINDS))
def test_log_snr_and_model_time_invert(name):
    process = ALL_KINDS[name]
    t = np.linspace(0.005, 0.995, 199)
    lam = process.log_snr(t, np)
    alpha, sigma = process.alpha_sigma(t, np)
    np.testing.assert_allclose(lam, 2 * np.log(alpha / sigma), rtol=1e-12)
    assert np.all(np.diff(lam) < 0)  # t = 1 is the noisiest
    np.testing.assert_allclose(process.t_from_log_snr(lam, np), t, atol=1e-10)
    model_t = process.model_time(t, np)
    np.testing.assert_allclose(process.t_from_model_time(model_t, np), t, atol=1e-10)
    # The network times of the module docstring, in closed form.
    expected_model_t = {
        "vp": t * T - 1,
        "flow": 1000 * t,
        "edm": 250 * np.log(sigma),
    }[process.kind]
    np.testing.assert_allclose(model_t, expected_model_t, rtol=1e-12)
    # float32 under jit: model_time and its inverse agree to float32 precision.
    t32 = jnp.asarray(t, jnp.float32)
    back = jax.jit(lambda p, t: p.t_from_model_time(p.model_time(t)))(process, t32)
    np.testing.assert_allclose(back, t, atol=2e-5)


def test_flow_and_edm_coefficients():
    t = np.linspace(0.0, 1.0, 101)
    alpha, sigma = PROCESSES["flow"].alpha_sigma(t, np)
    np.testing.assert_array_equal(alpha, 1 - t)
    np.testing.assert_array_equal(sigma, t)
    np.testing.assert_allclose(
        PROCESSES["flow"].log_snr(t[1:-1], np), 2 * np.log((1 - t[1:-1]) / t[1:-1])
    )
    for process in (PROCESSES["edm"], EDM_VARIANT):
        alpha, sigma = process.alpha_sigma(np.array([0.0, 1.0]), np)
        np.testing.assert_array_equal(alpha, 1.0)
        np.testing.assert_allclose(sigma, [process.sigma_min, process.sigma_max], rtol=1e-12)
        assert process.prior_std(process.sigma_max) == process.sigma_max


@pytest.mark.parametrize("process", [PROCESSES["edm"], EDM_VARIANT], ids=["default", "variant"])
@pytest.mark.parametrize("num_steps", [2, 18, 40])
def test_edm_levels_are_karras_eq5(process, num_steps):
    """sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    smin, smax, rho = process.sigma_min, process.sigma_max, process.rho
    i = np.arange(num_steps)
    karras = (
        smax ** (1 / rho) + i / (num_steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))
    ) ** rho
    for spacing in ("uniform", "karras"):
        levels = dj.sampling_levels(process, num_steps, spacing)
        # Levels are indexed by sampler step: i = S - 1 is the noisiest.
        np.testing.assert_allclose(levels.sigma[::-1], karras, rtol=1e-12)
        np.testing.assert_array_equal(levels.alpha, 1.0)
        np.testing.assert_allclose(levels.sigma_next, np.r_[0.0, levels.sigma[:-1]], rtol=1e-15)
        np.testing.assert_allclose(levels.model_t, 250 * np.log(levels.sigma), rtol=1e-12)


@pytest.mark.parametrize(
    "num_steps,spacing", [(None, "uniform"), (50, "uniform"), (37, "trailing")]
)
def test_discrete_vp_levels_are_the_respaced_schedule(num_steps, spacing):
    """Levels' q(x_{i-1} | x_i, x_0) is the (respaced) Schedule's posterior (Ho et al. eqs. 6-7)."""
    levels = dj.sampling_levels(PROCESSES["vp"], num_steps, spacing)
    if num_steps is None:
        sched = LINEAR
    else:
        sched = dj.respace(LINEAR, dj.space_timesteps(T, num_steps, spacing))
    assert levels.num_steps == sched.num_timesteps
    f64 = lambda a: np.asarray(a, np.float64)
    np.testing.assert_allclose(levels.post_coef_x0, f64(sched.posterior_mean_coef1), rtol=1e-5)
    np.testing.assert_allclose(levels.post_coef_xt, f64(sched.posterior_mean_coef2), rtol=1e-5)
    np.testing.assert_allclose(
        levels.post_var, f64(sched.posterior_variance), rtol=1e-5, atol=1e-12
    )
    np.testing.assert_allclose(
        levels.post_log_var, f64(sched.posterior_log_variance_clipped), rtol=1e-5
    )
    np.testing.assert_allclose(levels.step_var, f64(sched.betas), rtol=1e-5)
    np.testing.assert_allclose(levels.alpha**2, f64(sched.alphas_cumprod), rtol=1e-6)
    np.testing.assert_array_equal(levels.model_t, np.asarray(sched.model_timesteps))


# ================================================================ 2. conversions and losses


@pytest.mark.parametrize("name", ["vp_continuous", "flow", "edm", "edm_variant"])
@pytest.mark.parametrize("prediction", OBJECTIVES)
def test_output_round_trips_x0_and_eps(name, prediction):
    """x0_eps_from_output inverts output_target (float64), the targets are the papers' and
    x0_sensitivity is |d x_0 / d output|."""
    process = ALL_KINDS[name]
    rng = np.random.default_rng(0)
    t = rng.uniform(0.02, 0.98, (64, 1))
    alpha, sigma = process.alpha_sigma(t, np)
    x0, eps = rng.standard_normal((2, 64, 3))
    x_t = alpha * x0 + sigma * eps
    sd = process.sigma_data
    c_skip = sd**2 / ((sigma / alpha) ** 2 + sd**2)
    c_out = (sigma / alpha) * sd / np.sqrt((sigma / alpha) ** 2 + sd**2)
    expected = {
        "eps": eps,
        "x0": x0,
        "v": alpha * eps - sigma * x0,  # Salimans & Ho 2022
        "flow": eps - x0,  # Lipman et al. / Liu et al.: d x_t / dt on the flow process
        "edm": (x0 - c_skip * x_t / alpha) / c_out,  # Karras et al. eq. 8's F target
    }[prediction]
    with jax.enable_x64(True):
        a, s = jnp.asarray(alpha), jnp.asarray(sigma)
        out = dj.output_target(jnp.asarray(x0), jnp.asarray(eps), a, s, prediction, sd)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
        x0_back, eps_back = dj.x0_eps_from_output(out, jnp.asarray(x_t), a, s, prediction, sd)
        np.testing.assert_allclose(x0_back, x0, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(eps_back, eps, rtol=1e-9, atol=1e-10)
        _, dx0 = jax.jvp(
            lambda o: dj.x0_eps_from_output(o, jnp.asarray(x_t), a, s, prediction, sd)[0],
            (out,),
            (jnp.ones_like(out),),
        )
        k = jnp.broadcast_to(x0_sensitivity(a, s, prediction, sd), dx0.shape)
        np.testing.assert_allclose(np.abs(dx0), k, rtol=1e-9)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_preconditioning_is_table_1(sigma_data):
    sigma = np.geomspace(0.002, 80.0, 41)
    with jax.enable_x64(True):
        c_skip, c_out, c_in, c_noise = dj.edm_preconditioning(jnp.asarray(sigma), sigma_data)
        np.testing.assert_allclose(c_skip, sigma_data**2 / (sigma**2 + sigma_data**2), rtol=1e-13)
        np.testing.assert_allclose(
            c_out, sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2), rtol=1e-13
        )
        np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sigma_data**2), rtol=1e-13)
        np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-13)


W = np.array([[0.7, -0.4, 0.2], [0.1, 0.9, -0.6], [-0.3, 0.2, 0.5]])
B = np.array([0.3, -0.2, 0.1])


def toy_network(x_in, model_t):
    """Any function of (x_in, model_t): the losses must compare it with its target as written."""
    return jnp.tanh(x_in @ jnp.asarray(W, jnp.float32) + model_t[:, None] / 1000 * B)


def toy_network_np(x_in, model_t):
    return np.tanh(x_in @ W + model_t[:, None] / 1000 * B)


def loss_inputs(process, batch=64, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.05, 0.95, batch)
    x0 = 0.8 * rng.standard_normal((batch, 3))
    noise = rng.standard_normal((batch, 3))
    alpha, sigma = process.alpha_sigma(t, np)
    return t, x0, noise, alpha[:, None], sigma[:, None]


@pytest.mark.parametrize("name", ["edm", "edm_variant", "flow", "vp_continuous"])
def test_edm_loss_is_the_weighted_denoiser_loss(name):
    """Karras et al. eq. 8: lambda(sigma) ||D(y; sigma) - x_0||^2 with lambda = (sigma^2 + sd^2) /
    (sigma sd)^2 and D = c_skip y + c_out F(c_in y; c_noise), in y = x_t / alpha, sigma = sigma_t / alpha_t."""
    process = ALL_KINDS[name]
    t, x0, noise, alpha, sigma = loss_inputs(process)
    loss = dj.diffusion_loss(
        process, toy_network, jnp.asarray(x0, jnp.float32), jax.random.key(0), prediction="edm",
        t=jnp.asarray(t, jnp.float32), noise=jnp.asarray(noise, jnp.float32),
    )  # fmt: skip
    sd = process.sigma_data
    s = sigma / alpha
    y = x0 + s * noise
    c_skip, c_out, c_in = (
        sd**2 / (s**2 + sd**2),
        s * sd / np.sqrt(s**2 + sd**2),
        1 / np.sqrt(s**2 + sd**2),
    )
    model_t = {"vp": t * T - 1, "flow": 1000 * t, "edm": 250 * np.log(sigma[:, 0])}[process.kind]
    denoised = c_skip * y + c_out * toy_network_np(c_in * y, model_t)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    expected = np.mean(weight * (denoised - x0) ** 2, axis=1)
    np.testing.assert_allclose(loss, expected, rtol=2e-4)


@pytest.mark.parametrize(
    "name,prediction", [("flow", "flow"), ("vp_continuous", "v"), ("edm", "eps"), ("flow", "x0")]
)
def test_min_snr_loss_is_min_snr_times_the_x0_error(name, prediction):
    """Hang et al. 2023: min(SNR, gamma) ||x0_hat - x_0||^2, whatever the network predicts."""
    process, gamma = ALL_KINDS[name], 5.0
    t, x0, noise, alpha, sigma = loss_inputs(process, seed=1)
    loss = dj.diffusion_loss(
        process, toy_network, jnp.asarray(x0, jnp.float32), jax.random.key(0),
        prediction=prediction, min_snr_gamma=gamma, t=jnp.asarray(t, jnp.float32),
        noise=jnp.asarray(noise, jnp.float32),
    )  # fmt: skip
    x_t = alpha * x0 + sigma * noise
    x_in = x_t / np.sqrt(alpha**2 + sigma**2) if process.kind == "edm" else x_t
    model_t = {"vp": t * T - 1, "flow": 1000 * t, "edm": 250 * np.log(sigma[:, 0])}[process.kind]
    out = toy_network_np(x_in, model_t)
    x0_hat = {
        "flow": (x_t - sigma * out) / (alpha + sigma),  # u = eps - x_0
        "v": (alpha * x_t - sigma * out) / (alpha**2 + sigma**2),
        "eps": (x_t - sigma * out) / alpha,
        "x0": out,
    }[prediction]
    snr = (alpha[:, 0] / sigma[:, 0]) ** 2
    expected = np.minimum(snr, gamma) * np.mean((x0_hat - x0) ** 2, axis=1)
    assert np.any(snr > gamma) and np.any(snr < gamma)
    np.testing.assert_allclose(loss, expected, rtol=2e-4)


# ================================================================ 3. training-time samplers

NUM_TIMES = 20_000
# Kolmogorov-Smirnov: P(sqrt(n) D_n > 1.95) ~ 0.001 for n draws from the named distribution.
KS_CRITICAL = 1.95 / math.sqrt(NUM_TIMES)


def assert_normal(values, loc, scale):
    """values ~ N(loc, scale^2): KS distance, mean and std within 5 standard errors."""
    values = np.asarray(values, np.float64)
    n = values.size
    assert stats.kstest(values, "norm", args=(loc, scale)).statistic < KS_CRITICAL
    assert abs(values.mean() - loc) < 5 * scale / math.sqrt(n)
    assert abs(values.std() / scale - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("name", ["flow", "vp_continuous"])
def test_logit_normal_times(name):
    """SD3's logit-normal (Esser et al. 2024): logit(t) ~ N(loc, scale^2)."""
    t = sample_training_times(
        PROCESSES[name], jax.random.key(3), NUM_TIMES, "logit_normal", loc=0.3, scale=0.8
    )
    t = np.asarray(t, np.float64)
    assert np.all((t > 0) & (t < 1))
    assert_normal(np.log(t / (1 - t)), 0.3, 0.8)


@pytest.mark.parametrize("name", ["edm", "edm_variant", "flow", "vp_continuous"])
def test_log_normal_times(name):
    """EDM's log-normal (Karras et al. Table 1): ln(sigma / alpha) ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2)."""
    process = ALL_KINDS[name]
    t = sample_training_times(process, jax.random.key(4), NUM_TIMES, "log_normal", -1.2, 1.2)
    alpha, sigma = process.alpha_sigma(np.asarray(t, np.float64), np)
    assert_normal(np.log(sigma / alpha), -1.2, 1.2)


def test_diffusion_loss_draws_edm_log_normal_levels():
    """The loss gives the network c_noise = ln(sigma) / 4 (x 1000) at sigma ~ exp(N(loc, scale^2))."""
    seen = []

    def network(x_in, model_t):
        seen.append(np.asarray(model_t, np.float64))
        return jnp.zeros_like(x_in)

    dj.diffusion_loss(
        PROCESSES["edm"], network, jnp.zeros((NUM_TIMES, 1)), jax.random.key(5),
        prediction="edm", time_sampling="log_normal", time_loc=-1.2, time_scale=1.2,
    )  # fmt: skip
    assert_normal(seen[0] / 250.0, -1.2, 1.2)


# ================================================================ 4. every sampler on every process

N = 8192  # samples per run: the standard errors below are sqrt(1/N) of the std (and sqrt(2/N) of var)
# The samplers; num_steps chosen so the discretisation errors are well inside the tolerances below.
# ODE solvers also run at a quarter of their steps, to check that their error shrinks.
VARIANTS = {
    "ddpm": dict(sampler="ddpm", num_steps=1000),
    "ddim_eta0": dict(sampler="ddim", eta=0.0, num_steps=100),
    "ddim_eta1": dict(sampler="ddim", eta=1.0, num_steps=1000),
    "euler": dict(sampler="euler", num_steps=100),
    "heun": dict(sampler="heun", num_steps=48),
    "dpm_solver_2m": dict(sampler="dpm_solver_2m", num_steps=48),
    "dpm_solver_3m": dict(sampler="dpm_solver_3m", num_steps=48),
}
DETERMINISTIC = ("ddim_eta0", "euler", "heun", "dpm_solver_2m", "dpm_solver_3m")
ORDER = {"ddim_eta0": 1, "euler": 1, "heun": 2, "dpm_solver_2m": 2, "dpm_solver_3m": 2}
# Pointwise |x_0 - ODE(x_T)| <= C / S^order. Measured worst cases over the four processes (max over
# 256 points, x_T at the prior's scale): first order ~8.7 / S (EDM: its first step from sigma = 80
# dominates); second order ~45 / S^2 for heun and the DPM-Solvers (DPM-Solver++(3M)'s last steps fall
# back to lower order, and the final step to sigma = 0 is first order in sigma^2, so ~2 in practice).
# C below is twice the measured constant.
ERROR_CONSTANT = {1: 18.0, 2: 90.0}
NATIVE = {"flow": "flow", "edm": "edm"}  # each process's own parameterisation, checked too


def spacing_for(process, variant):
    """The samplers' default on the discrete VP process (karras for deterministic ones), uniform elsewhere.
    DDIM eta = 0 takes Euler's levels, so that the two can be compared."""
    return "karras" if process.is_discrete and variant in DETERMINISTIC else "uniform"


def test_every_sampler_is_in_the_matrix():
    assert {opts["sampler"] for opts in VARIANTS.values()} == set(SAMPLERS)
    assert set(ODE_SAMPLERS) <= {VARIANTS[v]["sampler"] for v in DETERMINISTIC}


@functools.cache
def oracle_runs(name, prediction):
    """{variant: (x_0, x_T)} [N, 2] float64 for every sampler on process ``name``, one compile."""
    process = PROCESSES[name]
    samplers = {}
    runs = [(v, VARIANTS[v]["num_steps"]) for v in VARIANTS]
    if prediction == "x0":
        runs += [(f"{v}@coarse", VARIANTS[v]["num_steps"] // 4) for v in DETERMINISTIC]
    for key, num_steps in runs:
        variant = key.split("@")[0]
        opts = {**VARIANTS[variant], "num_steps": num_steps}
        samplers[key] = dj.make_sampler(
            gaussian_oracle(process, prediction), process, prediction=prediction,
            clip_denoised=False, spacing=spacing_for(process, variant),
            trajectory_steps=[num_steps - 1], **opts,
        )  # fmt: skip
    run_all = jax.jit(lambda params, rng: {k: f(params, rng, (N, 2)) for k, f in samplers.items()})
    out = run_all(PARAMS, jax.random.key(0))
    # frames[0] is the input of the first (noisiest) step: the starting noise x_T.
    return {
        k: (np.asarray(x0, np.float64), np.asarray(frames[0], np.float64))
        for k, (x0, frames, _) in out.items()
    }


ORACLE_CASES = [(name, "x0") for name in PROCESSES] + list(NATIVE.items())


def test_reference_ode_is_the_quantile_map():
    """The RK4 reference against the closed-form solution, including flow's alpha_T = 0 start."""
    x_T = np.random.default_rng(0).standard_normal((64, 2))
    for alpha_T, sigma_T, std in FIRST_LEVEL.values():
        np.testing.assert_allclose(
            ode_reference(std * x_T, alpha_T, sigma_T), quantile_map(std * x_T, alpha_T, sigma_T),
            atol=1e-9,
        )  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name,prediction", ORACLE_CASES)
def test_sampler_draws_the_data_distribution(name, prediction, variant):
    """Sample mean and std of every sampler on every process against the data's.

    Tolerance: 5 standard errors of N samples, plus (a) the prior mismatch: x_T ~ N(0, std^2) while
    q(x_T) has mean alpha_T mu (VP: alpha_T = 0.006) and, on EDM, std sqrt(80^2 + s^2); through the
    probability-flow ODE this moves the output mean by s alpha_T |mu| / std_T (the ancestral chains
    forget x_T faster), and (b) discretisation: ancestral sampling (ddpm, ddim eta = 1) with the
    posterior variance underestimates the std by about 12.5 / S relative (exact linear-Gaussian
    propagation of the chain for s = 0.3, 1.25% at S = 1000: allow 2%); the deterministic solvers are
    within their pointwise bound (next test), which bounds the change in mean and std.
    """
    x0, x_T = oracle_runs(name, prediction)[variant]
    alpha_T, sigma_T, std = FIRST_LEVEL[name]
    assert np.all(np.isfinite(x0))
    # x_T ~ N(0, std^2).
    assert np.all(np.abs(x_T.mean(0)) < 5 * std / math.sqrt(N))
    assert np.all(np.abs(x_T.std(0) / std - 1) < 5 / math.sqrt(2 * N))
    prior_bias = S * alpha_T * np.abs(MU) / np.sqrt(alpha_T**2 * S**2 + sigma_T**2)
    if variant in DETERMINISTIC:
        steps = VARIANTS[variant]["num_steps"]
        discretisation = ERROR_CONSTANT[ORDER[variant]] / steps ** ORDER[variant]
        mean_tol = 5 * S / math.sqrt(N) + prior_bias + discretisation
        std_tol = 5 / math.sqrt(2 * N) + discretisation / S
    else:
        mean_tol = 5 * S / math.sqrt(N) + prior_bias
        std_tol = 5 / math.sqrt(2 * N) + 0.02
    np.testing.assert_array_less(np.abs(x0.mean(0) - MU), mean_tol)
    np.testing.assert_array_less(np.abs(x0.std(0) / S - 1), std_tol)


@pytest.mark.parametrize("variant", DETERMINISTIC)
@pytest.mark.parametrize("name,prediction", ORACLE_CASES)
def test_ode_sampler_follows_the_probability_flow_ode(name, prediction, variant):
    """Pointwise against a float64 RK4 solution of the same ODE from the same x_T, within C / S^order;
    the error shrinks (by at least 2.5x) when the steps are quadrupled."""
    runs = oracle_runs(name, prediction)
    x0, x_T = runs[variant]
    alpha_T, sigma_T, _ = FIRST_LEVEL[name]
    points = slice(0, 256)
    reference = ode_reference(x_T[points], alpha_T, sigma_T)
    error = np.max(np.abs(x0[points] - reference))
    steps, order = VARIANTS[variant]["num_steps"], ORDER[variant]
    assert error < ERROR_CONSTANT[order] / steps**order, error
    if prediction == "x0":
        coarse, coarse_x_T = runs[f"{variant}@coarse"]
        np.testing.assert_array_equal(coarse_x_T, x_T)  # same key, same shape: same x_T
        coarse_error = np.max(np.abs(coarse[points] - reference))
        assert error < coarse_error / 2.5, (error, coarse_error)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_sampler_first_level_is_t_equal_1(name):
    """What the references above assume: every sampler starts at t = 1 (alpha_T, sigma_T)."""
    alpha_T, sigma_T, std = FIRST_LEVEL[name]
    process = PROCESSES[name]
    for variant in VARIANTS:
        levels = dj.sampling_levels(
            process, VARIANTS[variant]["num_steps"], spacing_for(process, variant)
        )
        np.testing.assert_allclose(
            [levels.alpha[-1], levels.sigma[-1]], [alpha_T, sigma_T], rtol=1e-6
        )
        assert levels.alpha_next[0] == 1.0 and levels.sigma_next[0] == 0.0  # ends clean
        assert process.prior_std(levels.sigma[-1]) == pytest.approx(std)


def test_eps_prediction_is_refused_where_alpha_is_zero():
    """Flow's uniform levels start at t = 1, where x_0 = (x - sigma eps) / alpha is undefined."""
    flow = PROCESSES["flow"]
    for prediction in ("eps", "edm"):
        with pytest.raises(ValueError, match="cannot give x_0 where alpha = 0"):
            dj.make_sampler(
                gaussian_oracle(flow, prediction),
                flow,
                sampler="euler",
                num_steps=8,
                prediction=prediction,
            )
    # Karras spacing stops short of t = 1 (sigma / alpha = sigma_max).
    levels = dj.sampling_levels(flow, 8, "karras")
    assert np.all(levels.alpha > 0)
    np.testing.assert_allclose(levels.sigma[-1] / levels.alpha[-1], flow.sigma_max, rtol=1e-9)
    dj.make_sampler(
        gaussian_oracle(flow, "eps"),
        flow,
        sampler="euler",
        num_steps=8,
        spacing="karras",
        prediction="eps",
    )


# ================================================================ 5. identities


@pytest.mark.parametrize("name", list(PROCESSES))
def test_euler_is_ddim_eta0(name):
    """x' = alpha' (x / alpha + (s' - s) eps_hat) = alpha' x0_hat + sigma' eps_hat: DDIM eta = 0 (Song et
    al. eq. 12) is Euler on the probability-flow ODE (Karras et al. Algorithm 1) on any process."""
    runs = oracle_runs(name, "x0")
    (euler, euler_x_T), (ddim, ddim_x_T) = runs["euler"], runs["ddim_eta0"]
    np.testing.assert_array_equal(euler_x_T, ddim_x_T)
    np.testing.assert_allclose(euler, ddim, rtol=1e-5, atol=1e-5)


def test_flow_euler_is_the_velocity_step():
    """Rectified flow's sampler: x_{t'} = x_t + (t' - t) u(x_t, t), u = E[eps - x_0 | x_t], float64."""
    x0, x_T = oracle_runs("flow", "flow")["euler"]
    steps = VARIANTS["euler"]["num_steps"]
    t = np.linspace(1.0, 0.0, steps + 1)
    x = x_T[:256]
    for t_now, t_next in zip(t[:-1], t[1:], strict=True):
        x0_hat, eps_hat = posterior_np(x, 1 - t_now, t_now)
        x = x + (t_next - t_now) * (eps_hat - x0_hat)
    np.testing.assert_allclose(x0[:256], x, atol=5e-5)


# ================================================================ 6. EDM Algorithm 2


def edm_algorithm2(x_T, sigmas, s_churn, s_tmin, s_tmax, noise):
    """Karras et al. 2022 Algorithm 2 (stochastic Heun) in float64, D the Gaussian posterior mean.

    ``sigmas`` are t_0 > ... > t_{N-1} (t_N = 0); ``noise[i]`` is S_noise eps_i. Returns x_N, and the
    affine maps x_{i+1} = a_i x_hat_i + b_i of the deterministic part (for exact moments)."""
    n = len(sigmas)
    t = np.append(sigmas, 0.0)
    denoise = lambda x, sigma: posterior_np(x, 1.0, sigma)[0]
    x, maps = np.asarray(x_T, np.float64), []

    def heun_step(x_hat, t_hat, t_next):
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        return x_next

    gammas = []
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        x_hat = x + math.sqrt(t_hat**2 - t[i] ** 2) * noise[i]
        x = heun_step(x_hat, t_hat, t[i + 1])
        b = heun_step(np.zeros(2), t_hat, t[i + 1])
        maps.append(
            (heun_step(np.ones(2), t_hat, t[i + 1]) - b, b, math.sqrt(t_hat**2 - t[i] ** 2))
        )
        gammas.append(gamma)
    return x, maps, np.array(gammas)


EDM_STEPS, CHURN = 18, (5.0, 0.05, 10.0)  # S_churn, S_tmin, S_tmax


def edm_sigmas(process, n):
    i = np.arange(n)
    inv = 1 / process.rho
    return (
        process.sigma_max**inv + i / (n - 1) * (process.sigma_min**inv - process.sigma_max**inv)
    ) ** (1 / inv)


@functools.cache
def churn_runs():
    process = PROCESSES["edm"]
    samplers = {
        s_noise: dj.make_sampler(
            gaussian_oracle(process, "edm"),
            process,
            sampler="heun",
            num_steps=EDM_STEPS,
            prediction="edm",
            clip_denoised=False,
            s_churn=CHURN[0],
            s_tmin=CHURN[1],
            s_tmax=CHURN[2],
            s_noise=s_noise,
            trajectory_steps=[EDM_STEPS - 1],
        )  # fmt: skip
        for s_noise in (0.0, 1.0)
    }
    out = jax.jit(lambda p, r: {k: f(p, r, (N, 2)) for k, f in samplers.items()})(
        PARAMS, jax.random.key(7)
    )
    return {
        k: (np.asarray(x0, np.float64), np.asarray(fr[0], np.float64))
        for k, (x0, fr, _) in out.items()
    }


def test_heun_with_churn_is_edm_algorithm_2():
    """S_noise = 0: churn only raises the level the denoiser is evaluated at; deterministic, pointwise."""
    x0, x_T = churn_runs()[0.0]
    sigmas = edm_sigmas(PROCESSES["edm"], EDM_STEPS)
    reference, _, gammas = edm_algorithm2(x_T[:512], sigmas, *CHURN, np.zeros((EDM_STEPS, 1, 2)))
    # The churn acts on a middle range only (gamma = S_churn / N, uncapped), so the test sees both ends.
    assert (
        gammas[0] == 0
        and gammas[-1] == 0
        and np.all(gammas[(sigmas >= 0.05) & (sigmas <= 10)] == 5 / 18)
    )
    np.testing.assert_allclose(x0[:512], reference, atol=2e-4)
    # and churn changes the result: without it the sampler is plain Heun.
    no_churn, _, _ = edm_algorithm2(
        x_T[:512], sigmas, 0.0, 0.0, np.inf, np.zeros((EDM_STEPS, 1, 2))
    )
    assert np.max(np.abs(no_churn - reference)) > 1e-2


def test_heun_with_stochastic_churn_matches_edm_algorithm_2_moments():
    """S_noise = 1: sample moments against the exact moments of Algorithm 2 (an affine map of x_hat
    plus Gaussian churn noise per step, propagated in float64) within 5 standard errors, and so
    against the data within that plus Algorithm 2's own 18-step bias."""
    x0, x_T = churn_runs()[1.0]
    deterministic, _ = churn_runs()[0.0]
    assert np.max(np.abs(x0 - deterministic)) > 1e-2  # the churn noise is there
    sigmas = edm_sigmas(PROCESSES["edm"], EDM_STEPS)
    _, maps, _ = edm_algorithm2(x_T[:1], sigmas, *CHURN, np.zeros((EDM_STEPS, 1, 2)))
    mean, var = np.zeros(2), np.full(2, sigmas[0] ** 2)
    for a, b, churn_std in maps:
        mean, var = a * mean + b, a**2 * (var + churn_std**2)
    std = np.sqrt(var)
    np.testing.assert_array_less(np.abs(x0.mean(0) - mean), 5 * std / math.sqrt(N))
    np.testing.assert_array_less(np.abs(x0.std(0) / std - 1), 5 / math.sqrt(2 * N))
    bias = np.abs(std / S - 1)
    np.testing.assert_array_less(np.abs(x0.std(0) / S - 1), 5 / math.sqrt(2 * N) + bias)
    np.testing.assert_array_less(np.abs(x0.mean(0) - MU), 5 * S / math.sqrt(N) + np.abs(mean - MU))


# ================================================================ 7. guidance and editing under jit and vmap

NUM_CLASSES = 3
LABEL_PARAMS = {
    "mu": jnp.asarray(
        [[0.5, -1.0], [-0.7, 0.4], [1.2, 0.0], [0.0, 0.0]], jnp.float32
    ),  # row 3: null
    "s": PARAMS["s"],
}
GUIDED_SAMPLER = {
    "flow": dict(sampler="ddpm", num_steps=10),
    "edm": dict(sampler="heun", num_steps=10, s_churn=10.0),
}


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_classifier_free_guidance_scales_0_and_1_are_exact_under_vmap(name):
    process = PROCESSES[name]
    oracle = gaussian_oracle(process, "x0")
    kw = dict(prediction="x0", clip_denoised=False, **GUIDED_SAMPLER[name])
    guided = dj.make_sampler(
        dj.classifier_free_guidance(oracle, null_label=NUM_CLASSES), process, **kw
    )
    plain = dj.make_sampler(oracle, process, **kw)
    y = jnp.arange(16) % NUM_CLASSES
    shape = (16, 2)

    @jax.jit
    def run(rngs, w):
        both = jax.vmap(lambda r: guided(LABEL_PARAMS, r, shape, y=y, guidance_scale=w))(rngs)
        cond = jax.vmap(lambda r: plain(LABEL_PARAMS, r, shape, y=y))(rngs)
        uncond = jax.vmap(lambda r: plain(LABEL_PARAMS, r, shape, y=jnp.full_like(y, NUM_CLASSES)))(
            rngs
        )
        return both, cond, uncond

    rngs = jax.random.split(jax.random.key(11), 3)
    at_zero, cond, uncond = run(rngs, 0.0)
    at_one, _, _ = run(rngs, 1.0)
    np.testing.assert_array_equal(at_zero, uncond)
    np.testing.assert_array_equal(at_one, cond)
    assert np.all(np.isfinite(at_one))
    assert np.max(np.abs(cond - uncond)) > 0.1  # the label matters
    assert np.max(np.abs(at_one[0] - at_one[1])) > 0.1  # each vmapped key draws its own sample


@pytest.mark.parametrize("name", list(PROCESSES))
def test_inpainting_keeps_the_known_region_under_vmap(name):
    """Mask dimension 0 known: it comes back exactly; dimension 1 (independent of it) ~ N(mu_1, s_1^2)
    within 5 standard errors plus the 500-step ancestral bias (< 1.2%, see above: allow 3%)."""
    process = PROCESSES[name]
    inpaint = dj.make_inpainter(
        gaussian_oracle(process, "x0"), process, sampler="ddpm", num_steps=500, prediction="x0",
        clip_denoised=False,
    )  # fmt: skip
    images = jnp.asarray(MU + S * np.random.default_rng(2).standard_normal((1024, 2)), jnp.float32)
    mask = jnp.asarray([1.0, 0.0])
    rngs = jax.random.split(jax.random.key(12), 4)
    out = jax.jit(jax.vmap(lambda r: inpaint(PARAMS, r, images, mask)))(rngs)
    out = np.asarray(out, np.float64)
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(images[:, 0], out[..., 0].shape))
    free = out[..., 1].ravel()
    n = free.size
    assert abs(free.mean() - MU[1]) < 5 * S[1] / math.sqrt(n)
    assert abs(free.std() / S[1] - 1) < 5 / math.sqrt(2 * n) + 0.03
    assert np.max(np.abs(out[0, :, 1] - out[1, :, 1])) > 0.1


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_img2img_strength_zero_returns_the_input_under_vmap(name):
    process = PROCESSES[name]
    oracle = gaussian_oracle(process, "x0")
    images = jnp.asarray(MU + S * np.random.default_rng(3).standard_normal((8, 2)), jnp.float32)
    rngs = jax.random.split(jax.random.key(13), 2)
    for sampler in ("ddim", "dpm_solver_2m"):
        edit = dj.make_img2img(
            oracle, process, strength=0.0, sampler=sampler, num_steps=10, prediction="x0"
        )
        out = jax.jit(jax.vmap(lambda r, edit=edit: edit(PARAMS, r, images)))(rngs)
        np.testing.assert_array_equal(out, jnp.broadcast_to(images, out.shape))
