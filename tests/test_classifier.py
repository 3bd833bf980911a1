"""The noise-aware classifier and its loss; classifier guidance with a trained one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_models import check_forward_mode

import diffusion_jax as dj
from diffusion_jax.models import NoisyClassifier

SCHEDULE = dj.make_schedule("linear", 100)


def test_classifier_loss_matches_hand_computation():
    x0 = jnp.zeros((3, 4, 4, 1))
    t = jnp.array([0, 50, 99])
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    seen = {}

    def logits_fn(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return logits

    nll, hits = dj.classifier_loss(
        SCHEDULE, logits_fn, x0, jnp.array([0, 0, 1]), jax.random.key(1), t=t, noise=noise
    )
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True)
    np.testing.assert_allclose(nll, -np.log(p[[0, 1, 2], [0, 0, 1]]), rtol=1e-6)
    np.testing.assert_array_equal(hits, [1.0, 0.0, 0.0])  # ties go to the first class
    np.testing.assert_allclose(seen["x_t"], dj.q_sample(SCHEDULE, x0, t, noise), atol=1e-7)
    np.testing.assert_array_equal(seen["t"], t)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, num_classes\]"):
        dj.classifier_loss(SCHEDULE, lambda x, t: logits[0], x0, jnp.zeros(3), jax.random.key(0))


def test_trained_noisy_classifier_guides_the_sampler():
    """Two classes of 8x8 images (a bright left or right half). A classifier trained on noised
    images is accurate at low noise, near chance at high noise, and its guidance turns an
    unconditional denoiser (of the 50/50 mixture) toward the asked class."""
    model = NoisyClassifier(num_classes=2, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    left = jnp.zeros((8, 8, 1)).at[:, :4].set(0.8).at[:, 4:].set(-0.8)
    templates = jnp.stack([left, -left])  # class 0: left half bright; class 1: right half

    def batch(key, n=64):
        y = jax.random.bernoulli(key, 0.5, (n,)).astype(jnp.int32)
        return templates[y], y

    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    )["params"]
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, key):
        x0, y = batch(jax.random.fold_in(key, 0))

        def loss_fn(p):
            nll, _ = dj.classifier_loss(
                SCHEDULE, lambda x, t: model.apply({"params": p}, x, t), x0, y, key
            )
            return nll.mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    for step in range(150):
        params, opt_state = train_step(params, opt_state, jax.random.key(step))
    logits_fn = lambda p, x, t: model.apply({"params": p["classifier"]}, x, t)

    @jax.jit
    def accuracy(t_value):
        x0, y = batch(jax.random.key(123), 256)
        t = jnp.full((256,), t_value)
        _, hits = dj.classifier_loss(
            SCHEDULE,
            lambda x, tt: logits_fn({"classifier": params}, x, tt),
            x0,
            y,
            jax.random.key(7),
            t=t,
        )
        return hits.mean()

    assert float(accuracy(5)) > 0.95
    assert float(accuracy(99)) < 0.75  # x_T carries almost no information about the class

    def mixture_eps(p, x_t, t, **_):
        """Optimal eps for data that is exactly one of the two templates, 50/50."""
        abar = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        d2 = jnp.sum(
            (x_t[:, None] - jnp.sqrt(abar[:, None]) * templates[None]) ** 2, axis=(2, 3, 4)
        )
        w = jax.nn.softmax(-d2 / (2 * (1 - abar[:, 0, 0])), axis=-1)
        x0_hat = jnp.einsum("bk,khwc->bhwc", w, templates)
        return (x_t - jnp.sqrt(abar) * x0_hat) / jnp.sqrt(1 - abar)

    y = jnp.ones((64,), jnp.int32)
    for scale, expect in ((0.0, (0.3, 0.7)), (5.0, (0.9, 1.0))):
        sample = dj.make_sampler(
            mixture_eps, SCHEDULE, sampler="ddpm", cond_fn=dj.classifier_guidance(logits_fn, scale)
        )
        x = sample({"classifier": params}, jax.random.key(3), (64, 8, 8, 1), y=y)
        frac_right = float(
            jnp.mean(x[:, :, 4:].mean(axis=(1, 2, 3)) > x[:, :, :4].mean(axis=(1, 2, 3)))
        )
        assert expect[0] <= frac_right <= expect[1], (scale, frac_right)


def test_noisy_classifier_forward_mode_equals_reverse_mode(monkeypatch):
    """jax.jvp / jax.jacfwd through the classifier (ResBlocks, attention, downsampling, pooling)
    give plain reverse mode's directional derivatives (``test_models.check_forward_mode``)."""
    model = NoisyClassifier(num_classes=3, ch=32, ch_mult=(1, 2), attn_resolutions=(4,))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([5, 80])
    params = jax.jit(model.init)(jax.random.key(1), x, t)["params"]
    check_forward_mode(lambda p, x: model.apply({"params": p}, x, t), params, x, monkeypatch)
