"""Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", Algorithms 1 and 2).

Off, the train step and the samplers lower to the programs they lower to without the option, and
the loss and the samplers call the denoiser as before (checked once against the code before the
option existed: the same HLO text for every model, process, sampler and guidance). On, the models
take the previous x_0 estimate as C more input channels, the loss feeds a stop-gradiented first
pass to a random half of the batch, and the samplers feed step i's x0_hat into step i - 1 (checked
against float64 numpy transcriptions of DDIM and Heun with a denoiser that depends on it linearly).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import tiny_config

import diffusion_jax as dj
from diffusion_jax import (
    checkpoints,
    config_utils,
    convert,
    forward,
    generate,
    train_state,
    trainer,
)
from diffusion_jax.models import DiT, MLPDenoiser, UNet

TINY_UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, patch_size=2)
SCHEDULE = dj.make_schedule("linear", 100)


# ------------------------------------------------------------------ off: the program of today


def points_config(**model):
    """The tiny config on 2-D moons with a small class-conditional MLP (cheap to lower and to
    train; label dropout for classifier-free guidance)."""
    cfg = tiny_config()
    cfg.data.source = "moons"
    cfg.data.num_points = 256
    cfg.model = dict(name="mlp", hidden=16, num_layers=1, num_classes=2, **model)
    cfg.diffusion.num_timesteps = 30
    cfg.train.batch_size = 16
    cfg.sample.num_samples = 0
    cfg.sample.clip_denoised = False
    return cfg


def _lowered(**model) -> tuple[str, str]:
    """The lowered train step and heun sampler of :func:`points_config`."""
    cfg = config_utils.parse_config(points_config(**model))
    model = config_utils.build_model(cfg)
    tx, lr_fn = train_state.make_optimizer(cfg.optim, cfg.train.num_steps)
    state = jax.eval_shape(lambda: trainer.init_state(model, cfg, (2,), tx))
    batch = {
        "x": jax.ShapeDtypeStruct((16, 2), jnp.float32),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32),
    }
    step = jax.jit(trainer.make_train_step(model, cfg, tx, lr_fn))
    step_text = step.lower(state, batch, config_utils.build_process(cfg)).as_text()
    sampler = config_utils.build_sampler(cfg, model, sampler="heun", num_steps=3)
    sample = jax.jit(lambda p, rng: sampler(p, rng, (4, 2)))
    return step_text, sample.lower(state.params, jax.random.key(0)).as_text()


def test_off_lowers_to_the_same_train_step_and_sampler_as_without_the_option():
    absent, off, on = _lowered(), _lowered(self_condition=False), _lowered(self_condition=True)
    assert absent == off
    assert on[0] != off[0] and on[1] != off[1]


def test_off_loss_and_sampler_call_the_denoiser_as_before():
    """Without the option the loss and every sampler call the denoiser with (x, t) only: a denoiser
    of the old signature works, and the HLO equals that of make_sampler's default."""

    def eps_fn(x_t, t):  # no x_self_cond parameter
        return 0.5 * x_t

    x0 = jax.random.uniform(jax.random.key(0), (4, 3), minval=-1, maxval=1)
    for self_condition in (None, False):
        kw = {} if self_condition is None else {"self_condition": self_condition}
        loss = dj.diffusion_loss(SCHEDULE, eps_fn, x0, jax.random.key(1), **kw)
        chex.assert_shape(loss, (4,))
    denoise = lambda params, x, t: params * x
    for sampler in dj.sampling.SAMPLERS:
        lowered = []
        for kw in ({}, {"self_condition": False}):
            s = dj.make_sampler(denoise, SCHEDULE, sampler=sampler, num_steps=3, **kw)
            f = jax.jit(lambda p, rng, s=s: s(p, rng, (2, 3)))
            lowered.append(f.lower(0.5, jax.random.key(0)).as_text())
        assert lowered[0] == lowered[1], sampler


# ------------------------------------------------------------------ models


@pytest.mark.parametrize(
    "cls, kwargs, shape, layer",
    [
        (UNet, TINY_UNET, (2, 8, 8, 3), "conv_in"),
        (DiT, TINY_DIT, (2, 8, 8, 3), "x_embedder"),
        (MLPDenoiser, dict(hidden=16, num_layers=1), (2, 3), "dense_in"),
    ],
)
def test_self_condition_adds_exactly_the_estimates_input_channels(cls, kwargs, shape, layer):
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.array([3, 7])
    plain, model = cls(**kwargs), cls(**kwargs, self_condition=True)
    init = lambda m: jax.eval_shape(m.init, jax.random.key(0), x, t)["params"]
    shapes0 = jax.tree.map(lambda a: a.shape, init(plain))
    shapes1 = jax.tree.map(lambda a: a.shape, init(model))
    kernel0, kernel1 = shapes0[layer].pop("kernel"), shapes1[layer].pop("kernel")
    assert shapes0 == shapes1  # every other parameter as it was
    channels = shape[-1]
    if cls is UNet:  # (3, 3, C, ch) -> (3, 3, 2C, ch)
        assert kernel1 == kernel0[:2] + (2 * channels,) + kernel0[3:]
    elif cls is DiT:  # (p p C, D) -> (p p 2C, D)
        assert kernel1 == (2 * kernel0[0], kernel0[1])
    else:  # (D + time embedding, hidden) -> (2D + time embedding, hidden)
        assert kernel1 == (kernel0[0] + channels, kernel0[1])

    # Random parameters: the zero-initialised output layers would hide the estimate.
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape, np.float32), init(model))
    estimate = jax.random.uniform(jax.random.key(2), shape, minval=-1, maxval=1)
    apply = lambda p, x, t, e: model.apply({"params": p}, x, t, x_self_cond=e)
    both = lambda a, b: jnp.concatenate([a, b])  # one forward pass for two inputs
    out = jax.jit(apply)(params, both(x, x), both(t, t), both(estimate, jnp.zeros(shape)))
    chex.assert_shape(out, (2 * shape[0],) + shape[1:])
    assert not np.allclose(out[:2], out[2:], atol=1e-3)
    if cls is MLPDenoiser:  # no estimate is the zero estimate
        np.testing.assert_allclose(apply(params, x, t, None), out[2:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="without self-conditioning"):
        jax.eval_shape(lambda: plain.init(jax.random.key(0), x, t, x_self_cond=estimate))
    with pytest.raises(ValueError, match="x_self_cond must have the shape of x"):
        jax.eval_shape(lambda: apply(params, x, t, estimate[:1]))


def test_model_self_condition_in_a_config_is_enough():
    cfg = tiny_config()
    cfg.model.self_condition = True
    parsed = config_utils.parse_config(cfg)
    assert parsed.model.self_condition
    model = config_utils.build_model(parsed)
    assert model.self_condition
    params = jax.eval_shape(
        lambda: config_utils.init_params(model, parsed, (8, 8, 1), jax.random.key(0))
    )
    assert params["conv_in"]["kernel"].shape == (3, 3, 2, 32)
    with pytest.raises(convert.UnsupportedDiffusersModel, match="model.self_condition=True"):
        convert.diffusers_from_config(parsed, (8, 8, 1))  # diffusers has no such input


# ------------------------------------------------------------------ the loss


class Spy:
    """A linear denoiser ``w x + v x_self_cond`` that records what each call was given."""

    def __init__(self, params, doubled=False):
        self.params, self.doubled, self.calls = params, doubled, []

    def __call__(self, x_in, model_t, x_self_cond=None):
        self.calls.append((x_in, model_t, x_self_cond))
        return self.apply(self.params, x_in, x_self_cond)

    def apply(self, params, x_in, x_self_cond):
        out = params["w"] * x_in + params["v"] * x_self_cond
        return jnp.concatenate([out, 0.1 * out], -1) if self.doubled else out


PARAMS = {"w": jnp.float32(0.7), "v": jnp.float32(0.3)}
CASES = [  # (process, prediction)
    (SCHEDULE, "eps"),
    (SCHEDULE, "v"),
    (dj.make_process("vp", schedule=SCHEDULE, discrete=False), "x0"),
    (dj.make_process("flow"), "flow"),
    (dj.make_process("edm"), "edm"),
    (dj.make_process("edm"), "eps"),
]


@pytest.mark.parametrize("process, prediction", CASES)
def test_loss_feeds_a_stop_gradient_first_pass_to_a_random_half(process, prediction):
    batch = 64
    x0 = jax.random.uniform(jax.random.key(0), (batch, 2, 2, 1), minval=-1, maxval=1)
    rng = jax.random.key(5)
    process = dj.processes.as_process(process)
    if process.is_discrete:
        t = jax.random.randint(jax.random.key(3), (batch,), 0, 100)
        alpha = SCHEDULE.sqrt_alphas_cumprod[t][:, None, None, None]
        sigma = SCHEDULE.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    else:
        t = jax.random.uniform(jax.random.key(3), (batch,), minval=0.05, maxval=0.95)
        alpha, sigma = (a[:, None, None, None] for a in process.alpha_sigma(t))
    noise = jax.random.normal(jax.random.key(4), x0.shape)
    kw = dict(prediction=prediction, t=t, noise=noise, clip_denoised=True)

    def calls():
        spy = Spy(PARAMS)
        dj.diffusion_loss(process, spy, x0, rng, self_condition=True, **kw)
        return spy.calls

    (first_in, _, first_sc), (second_in, _, second_sc) = jax.jit(calls)()
    np.testing.assert_array_equal(first_sc, 0.0)
    np.testing.assert_array_equal(first_in, second_in)
    x_t = alpha * x0 + sigma * noise
    scale = forward.network_input_scale(alpha, sigma, prediction, process.kind)
    np.testing.assert_allclose(first_in, x_t if scale is None else x_t * scale, rtol=1e-6)
    out = PARAMS["w"] * first_in  # the first pass's output, by hand
    x0_hat, _ = forward.x0_eps_from_output(out, x_t, alpha, sigma, prediction, process.sigma_data)
    x0_hat = np.clip(x0_hat, -1.0, 1.0)  # of the unscaled x_t: the estimate is in data space
    used = np.asarray(jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5, (batch,)))
    assert 0.25 < used.mean() < 0.75
    np.testing.assert_allclose(second_sc[used], x0_hat[used], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(second_sc[~used], 0.0)

    # No gradient through the first pass: the gradient is that of the loss with the estimate fed
    # in as a constant.
    estimate = second_sc

    def loss(params, self_condition):
        if self_condition:
            fn = lambda x, m, x_self_cond=None: Spy(params)(x, m, x_self_cond)
        else:
            fn = lambda x, m: Spy(params)(x, m, estimate)
        return jnp.mean(
            dj.diffusion_loss(process, fn, x0, rng, self_condition=self_condition, **kw)
        )

    grads = jax.jit(jax.grad(loss), static_argnums=1)
    g_on, g_const = grads(PARAMS, True), grads(PARAMS, False)
    chex.assert_trees_all_close(g_on, g_const, rtol=1e-6)


def test_hybrid_loss_conditions_on_the_mean_channels():
    x0 = jax.random.uniform(jax.random.key(0), (32, 3), minval=-1, maxval=1)
    t = jax.random.randint(jax.random.key(1), (32,), 0, 100)
    noise = jax.random.normal(jax.random.key(2), x0.shape)

    def calls():
        spy = Spy(PARAMS, doubled=True)
        per_example = dj.hybrid_loss(
            SCHEDULE, spy, x0, jax.random.key(3), t=t, noise=noise, self_condition=True,
            clip_denoised=False,
        )  # fmt: skip
        chex.assert_shape(per_example, (32,))
        return spy.calls

    (x_t, _, zeros), (_, _, second_sc) = jax.jit(calls)()
    np.testing.assert_array_equal(zeros, 0.0)
    x0_hat = forward.predict_x0_from_eps(SCHEDULE, x_t, t, PARAMS["w"] * x_t)
    used = np.asarray(jax.random.bernoulli(jax.random.fold_in(jax.random.key(3), 1), 0.5, (32,)))
    np.testing.assert_allclose(second_sc[used], x0_hat[used], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(second_sc[~used], 0.0)


# ------------------------------------------------------------------ samplers

A, B = 0.6, 0.5  # the spy denoiser's eps = A x + B x_self_cond


def spy_denoise(params, x, t, x_self_cond=None, **_):
    del t
    return params["a"] * x + params["b"] * (0.0 if x_self_cond is None else x_self_cond)


def _start(rng, shape):
    return np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64)


def _predict(x, estimate, alpha, sigma, clip):
    eps = A * x + B * estimate
    x0 = (x - sigma * eps) / alpha
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return x0, eps


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_feeds_each_steps_estimate_into_the_next(clip):
    """Song et al. eq. 12 with eta = 0, and x_self_cond = the previous step's x0_hat (zeros first),
    in float64 numpy."""
    rng, shape, num_steps = jax.random.key(7), (4, 3), 5
    sample = dj.make_sampler(
        spy_denoise, SCHEDULE, sampler="ddim", num_steps=num_steps, clip_denoised=clip,
        self_condition=True,
    )  # fmt: skip
    got = sample({"a": A, "b": B}, rng, shape)
    lv = dj.sampling_levels(SCHEDULE, num_steps, "uniform")
    x, estimate = _start(rng, shape), np.zeros(shape)
    for i in range(num_steps - 1, -1, -1):
        x0, eps = _predict(x, estimate, lv.alpha[i], lv.sigma[i], clip)
        x, estimate = lv.alpha_next[i] * x0 + lv.sigma_next[i] * eps, x0
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)
    unconditioned = dj.make_sampler(spy_denoise, SCHEDULE, sampler="ddim", num_steps=num_steps)
    assert not np.allclose(unconditioned({"a": A, "b": B}, rng, shape), got, atol=1e-3)


def test_heuns_second_evaluation_gets_the_first_ones_estimate():
    """Karras et al. Algorithm 2 (no churn) in y = x / alpha, in float64 numpy: both evaluations
    of step i see step i + 1's x0_hat, except the second, which sees the first's."""
    rng, shape, num_steps = jax.random.key(8), (4, 3), 4
    sample = dj.make_sampler(
        spy_denoise, SCHEDULE, sampler="heun", num_steps=num_steps, clip_denoised=False,
        self_condition=True,
    )  # fmt: skip
    got = sample({"a": A, "b": B}, rng, shape)
    lv = dj.sampling_levels(SCHEDULE, num_steps, "karras")
    x, estimate = _start(rng, shape), np.zeros(shape)
    for i in range(num_steps - 1, -1, -1):
        x0, eps = _predict(x, estimate, lv.alpha[i], lv.sigma[i], clip=False)
        h = lv.sigma_next[i] / lv.alpha_next[i] - lv.sigma[i] / lv.alpha[i]
        y = x / lv.alpha[i]
        y_next = y + h * eps
        if i > 0:
            _, eps2 = _predict(
                lv.alpha_next[i] * y_next, x0, lv.alpha[i - 1], lv.sigma[i - 1], False
            )
            y_next = y + 0.5 * h * (eps + eps2)
        x, estimate = lv.alpha_next[i] * y_next, x0
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", dj.sampling.SAMPLERS)
def test_a_denoiser_that_ignores_the_estimate_samples_as_without_it(sampler):
    """With B = 0 every sampler gives what it gives without self-conditioning (the carried estimate
    changes nothing else); with B != 0 the result changes."""
    process = dj.make_process("edm") if sampler == "heun" else SCHEDULE
    kw = dict(sampler=sampler, num_steps=4, s_churn=1.0 if sampler == "heun" else 0.0)
    rng, shape = jax.random.key(9), (3, 2)
    plain = dj.make_sampler(spy_denoise, process, **kw)({"a": A, "b": 0.0}, rng, shape)
    sc = jax.jit(dj.make_sampler(spy_denoise, process, self_condition=True, **kw), static_argnums=2)
    np.testing.assert_allclose(sc({"a": A, "b": 0.0}, rng, shape), plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(sc({"a": A, "b": B}, rng, shape), plain, atol=1e-4)


def test_guidance_and_inpainting_carry_the_estimate():
    """Classifier-free guidance gives both halves of its doubled batch the estimate; classifier
    guidance's cond_fn accepts it; RePaint's repeats carry it. At guidance scale 1 and B = 0 the
    results are those of the plain sampler."""
    rng, shape = jax.random.key(10), (3, 2)
    null = 2

    def labelled(params, x, t, y, x_self_cond=None):
        assert x_self_cond is None or x_self_cond.shape == x.shape
        return spy_denoise(params, x, t, x_self_cond) + 0.1 * (y == null)[:, None]

    guided = dj.classifier_free_guidance(labelled, null_label=null)
    y = jnp.array([0, 1, 0])
    kw = dict(sampler="ddim", num_steps=4, self_condition=True)
    cfg = dj.make_sampler(guided, SCHEDULE, **kw)
    plain = dj.make_sampler(labelled, SCHEDULE, **kw)
    params = {"a": A, "b": B}
    np.testing.assert_allclose(
        cfg(params, rng, shape, y=y, guidance_scale=1.0), plain(params, rng, shape, y=y), rtol=1e-5
    )

    classifier = lambda p, x, t: jnp.stack([x[:, 0], -x[:, 0]], axis=-1)
    cond_fn = dj.classifier_guidance(classifier, scale=1.0)
    s = dj.make_sampler(spy_denoise, SCHEDULE, cond_fn=cond_fn, **kw)
    assert np.all(np.isfinite(s(params, rng, shape, y=y)))

    images = jax.random.uniform(jax.random.key(11), shape, minval=-1, maxval=1)
    mask = jnp.array([[1.0, 0.0]])
    kw = dict(num_steps=4, resample=3)
    inpaint = jax.jit(dj.make_inpainter(spy_denoise, SCHEDULE, self_condition=True, **kw))
    filled = inpaint(params, rng, images, mask)
    np.testing.assert_array_equal(filled[:, 0], images[:, 0])
    plain = jax.jit(dj.make_inpainter(spy_denoise, SCHEDULE, **kw))
    np.testing.assert_allclose(
        inpaint({"a": A, "b": 0.0}, rng, images, mask),
        plain({"a": A, "b": 0.0}, rng, images, mask),
        rtol=1e-6,
        atol=1e-6,
    )
    assert not np.allclose(filled, plain(params, rng, images, mask), atol=1e-4)


# ------------------------------------------------------------------ end to end


def test_train_and_sample_a_self_conditioned_run(tmp_path):
    """A few steps of a self-conditioned 2-D MLP through the trainer, then samples through
    checkpoints.load_sampler (the estimate goes through denoise_fn_for) and with classifier-free
    guidance through generate.make_guided_sampler (sample.py's)."""
    cfg = points_config(self_condition=True)
    cfg.train.num_steps = 3
    cfg.checkpoint.every_steps = 3
    state = trainer.train_and_evaluate(cfg, tmp_path)
    assert int(state.step) == 3
    assert state.params["dense_in"]["kernel"].shape[0] == 2 * 2 + 16 + 16  # x, estimate, t, y

    run = checkpoints.load_sampler(tmp_path, sampler="ddim", num_steps=3)
    assert run.config.model.self_condition
    points = run.sample(run.params, jax.random.key(0), (5, *run.data_shape))
    chex.assert_shape(points, (5, 2))
    assert np.all(np.isfinite(points))

    guided = generate.make_guided_sampler(tmp_path, sampler="ddim", num_steps=3, guidance_scale=2.0)
    y = jnp.array([0, 1, 0, 1])
    points = guided.sample(guided.params, jax.random.key(0), (4, 2), y=y, guidance_scale=2.0)
    assert np.all(np.isfinite(points))
