"""ops/norm.py: GroupNorm(+swish) under jax.checkpoint, against float64 numpy and flax's GroupNorm,
in reverse and forward mode; reverse mode keeps only the inputs."""

import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from diffusion_jax.ops import GroupNorm


def np_group_norm(x, scale, bias, groups, eps, swish):
    """Float64 numpy GroupNorm over all but the first and last axes, two-pass variance."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
    return y / (1 + np.exp(-y)) if swish else y


def _inputs(shape, seed=0):
    kx, ks, kb = jax.random.split(jax.random.key(seed), 3)
    c = shape[-1]
    x = jax.random.normal(kx, shape) * 2.0 + 0.5  # off-centre, so the mean matters
    scale = 1.0 + 0.3 * jax.random.normal(ks, (c,))
    bias = 0.3 * jax.random.normal(kb, (c,))
    return x, {"params": {"scale": scale, "bias": bias}}


CASES = [((3, 6, 5, 64), 32), ((2, 7, 16), 4), ((2, 4, 4, 32), 1)]


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("shape,groups", CASES)
def test_values_match_float64(shape, groups, swish):
    x, params = _inputs(shape)
    out = GroupNorm(groups, 1e-6, swish=swish).apply(params, x)
    p = params["params"]
    want = np_group_norm(x, np.asarray(p["scale"]), np.asarray(p["bias"]), groups, 1e-6, swish)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("shape,groups", CASES[:2])
def test_gradients_match_float64_finite_differences(shape, groups, swish):
    """<grad, v> for random directions v in x, scale and bias, against float64 central differences
    of the numpy forward (step 1e-5: truncation ~1e-10, float64 rounding ~1e-11 relative)."""
    x, params = _inputs(shape, seed=1)
    w = np.asarray(jax.random.normal(jax.random.key(5), shape), np.float64)
    module = GroupNorm(groups, 1e-6, swish=swish)

    def loss(params, x):
        return jnp.sum(module.apply(params, x) * w)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    base = {
        "x": np.asarray(x, np.float64),
        "scale": np.asarray(params["params"]["scale"], np.float64),
        "bias": np.asarray(params["params"]["bias"], np.float64),
    }
    grads = {"x": g_x, "scale": g_params["params"]["scale"], "bias": g_params["params"]["bias"]}
    rng = np.random.default_rng(0)
    h = 1e-5
    for name, g in grads.items():
        v = rng.standard_normal(base[name].shape)

        def f(t, name=name, v=v):
            a = dict(base)
            a[name] = base[name] + t * v
            return np.sum(np_group_norm(a["x"], a["scale"], a["bias"], groups, 1e-6, swish) * w)

        want = (f(h) - f(-h)) / (2 * h)
        got = float(np.sum(np.asarray(g, np.float64) * v))
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (name, got, want)


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("shape,groups", CASES[:2])
def test_forward_mode_matches_float64_finite_differences(shape, groups, swish):
    """jax.jvp with tangents in x, scale and bias at once, against float64 central differences of
    the numpy forward along the same direction, elementwise."""
    x, params = _inputs(shape, seed=4)
    module = GroupNorm(groups, 1e-6, swish=swish)
    rng = np.random.default_rng(1)
    p = params["params"]
    v = {k: rng.standard_normal(a.shape) for k, a in (("x", x), *p.items())}
    tangents = {"params": {k: jnp.asarray(v[k], jnp.float32) for k in p}}
    _, got = jax.jvp(
        lambda params, x: module.apply(params, x),
        (params, x),
        (tangents, jnp.asarray(v["x"], jnp.float32)),
    )

    def f(t):
        return np_group_norm(
            np.asarray(x, np.float64) + t * v["x"],
            np.asarray(p["scale"], np.float64) + t * v["scale"],
            np.asarray(p["bias"], np.float64) + t * v["bias"],
            groups,
            1e-6,
            swish,
        )

    h = 1e-5
    want = (f(h) - f(-h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3)


def _saved_residuals(f, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return [line for line in out.getvalue().splitlines() if line]


@pytest.mark.parametrize("dtype, short", [(jnp.float32, "f32"), (jnp.bfloat16, "bf16")])
def test_reverse_mode_saves_only_the_inputs_and_group_statistics(dtype, short):
    """Under jax.checkpoint the backward pass recomputes the normalisation: the residuals are x (in
    its own dtype), scale, bias and the per-group mean and 1/std [B, G], and nothing of x's size in
    float32 for a bfloat16 x."""
    x, params = _inputs((2, 4, 4, 64))
    module = GroupNorm(32, 1e-6, swish=True)
    saved = _saved_residuals(lambda p, x: jnp.sum(module.apply(p, x)), params, x.astype(dtype))
    # Through lax.platform_dependent (a cond on the platform index, which both branches share):
    # the index, x, scale, bias and the two [B, G] statistics.
    shapes = sorted(line.split(" ")[0] for line in saved)
    expected = sorted(
        [f"{short}[2,4,4,64]", "f32[64]", "f32[64]", "f32[2,32]", "f32[2,32]", "i32[]"]
    )
    assert shapes == expected, saved


@pytest.mark.parametrize("swish", [False, True])
def test_gradients_match_flax_autodiff_elementwise(swish):
    """Every gradient entry equals autodiff through flax.linen.GroupNorm (then jax.nn.swish)."""
    x, params = _inputs((2, 8, 8, 64), seed=2)
    w = jax.random.normal(jax.random.key(6), x.shape)
    ours = GroupNorm(32, 1e-6, swish=swish)
    ref = nn.GroupNorm(num_groups=32, epsilon=1e-6)
    post = jax.nn.swish if swish else (lambda v: v)

    g_ours = jax.grad(lambda p, x: jnp.sum(ours.apply(p, x) * w), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(post(ref.apply(p, x)) * w), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_same_parameters_as_flax_group_norm():
    x = jnp.ones((1, 4, 4, 64))
    ours = GroupNorm(32).init(jax.random.key(0), x)
    ref = nn.GroupNorm(num_groups=32).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_input_computes_in_float32_and_returns_bfloat16_values_and_gradients():
    x, params = _inputs((2, 4, 4, 64), seed=3)
    out = GroupNorm(32, 1e-6, swish=True).apply(params, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    p = params["params"]
    xb = np.asarray(x.astype(jnp.bfloat16), np.float64)
    want = np_group_norm(xb, np.asarray(p["scale"]), np.asarray(p["bias"]), 32, 1e-6, True)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-2, atol=1e-2)
    # x's gradient comes back in bfloat16, close to the float32 gradient at the same point.
    w = jax.random.normal(jax.random.key(4), x.shape)
    module = GroupNorm(32, 1e-6, swish=True)

    def grad_x(x):
        return jax.grad(lambda x: jnp.sum(module.apply(params, x).astype(jnp.float32) * w))(x)

    g16 = grad_x(x.astype(jnp.bfloat16))
    g32 = grad_x(x.astype(jnp.bfloat16).astype(jnp.float32))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32), rtol=2e-2, atol=2e-2)


def test_channels_not_divisible_into_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        GroupNorm(32).init(jax.random.key(0), jnp.ones((1, 4, 4, 48)))
