"""Denoisers: shapes, the DDPM CIFAR-10 parameter count, the timestep embedding against float64
numpy, bfloat16 compute, labels and the null class, dropout, ADM options, remat, eager errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from diffusion_jax.models import MLPDenoiser, UNet, timestep_embedding
from diffusion_jax.models.unet import AttnBlock
from diffusion_jax.ops import dense as dense_lib

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
ONE_LEVEL = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)


def count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def abstract_params(model, x_shape):
    """Parameter shapes from ``jax.eval_shape`` on init: no FLOPs, no memory."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32)
    variables = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), x, t)
    return variables["params"]


def random_params(model, x, t, y=None, seed=0):
    """Random float32 params of the right shapes (numpy, no init compile): kernels ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.05^2), biases ~ N(0, 0.05^2), embeddings ~ N(0, 1). Unlike a fresh
    init, the zero-initialised output layers are not zero, so every input reaches the output."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if "kernel" in name:
            return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))
        if "scale" in name:
            return jnp.asarray(1.0 + 0.05 * z)
        if "embedding" in name:
            return jnp.asarray(z)
        return jnp.asarray(0.05 * z)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def batch(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    t = jnp.arange(shape[0], dtype=jnp.int32) * 97 % 1000
    return x, t


# ----------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize(
    "shape, extra, out_ch",
    [
        ((2, 8, 8, 3), {}, 3),
        ((1, 16, 16, 1), dict(attn_resolutions=(8,)), 1),
        ((2, 8, 16, 4), {}, 4),  # non-square
        ((2, 8, 8, 3), dict(learn_sigma=True), 6),
        ((2, 8, 8, 3), dict(out_channels=5, learn_sigma=True), 10),
        ((2, 16, 16, 3), dict(ch_mult=(1, 2, 2), attn_resolutions=(8, 4)), 3),
    ],
)
def test_unet_output_shape(shape, extra, out_ch):
    model = UNet(**{**TINY, **extra})
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    out = jax.eval_shape(lambda x, t: model.init_with_output(jax.random.key(0), x, t)[0], x, t)
    assert out.shape == shape[:3] + (out_ch,)
    assert out.dtype == jnp.float32


def test_unet_runs_under_jit_and_starts_at_zero():
    model = UNet(**ONE_LEVEL)
    x, t = batch((2, 8, 8, 3))
    params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
    out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, t)
    chex.assert_shape(out, x.shape)
    # DDPM zero-initialises conv_out, so a fresh network predicts exactly zero.
    np.testing.assert_array_equal(out, 0.0)
    assert params["conv_out"]["kernel"].shape == (3, 3, 32, 3)


def test_unet_cifar10_param_count_is_the_papers():
    """Ho et al.'s 35.7M CIFAR-10 model; equals diffusers' UNet2DModel for google/ddpm-cifar10-32."""
    params = abstract_params(UNet(), (1, 32, 32, 3))
    assert count(params) == 35_746_307


def test_unet_float_timesteps_accepted():
    model = UNet(**TINY)
    x, t = batch((2, 8, 8, 3))
    params = random_params(model, x, t)
    a = model.apply({"params": params}, x, t)
    b = model.apply({"params": params}, x, t.astype(jnp.float32))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- embedding


def numpy_timestep_embedding(t, dim):
    """Independent float64 transcription of DDPM's get_timestep_embedding."""
    t = np.asarray(t, np.float64)
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float64) * -scale)
    args = t[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, [(0, 0), (0, 1)])
    return emb


@pytest.mark.parametrize("dim", [4, 7, 32, 128])
def test_timestep_embedding_matches_float64_numpy(dim):
    t = np.array([0, 1, 2, 10, 250, 999])
    got = jax.jit(timestep_embedding, static_argnums=1)(jnp.asarray(t, jnp.int32), dim)
    assert got.shape == (len(t), dim) and got.dtype == jnp.float32
    # float32 arguments up to t = 999 carry ~1e-4 absolute rounding error.
    np.testing.assert_allclose(got, numpy_timestep_embedding(t, dim), atol=2e-4, rtol=0)
    # t = 0 is sin 0 = 0, cos 0 = 1 exactly.
    np.testing.assert_array_equal(got[0, : dim // 2], 0.0)
    np.testing.assert_array_equal(got[0, dim // 2 : 2 * (dim // 2)], 1.0)


def test_timestep_embedding_errors():
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        timestep_embedding(jnp.zeros((2, 1)), 32)
    with pytest.raises(ValueError, match="at least 4"):
        timestep_embedding(jnp.zeros((2,)), 2)


# ----------------------------------------------------------------------------- dtypes


def test_unet_bfloat16_compute_float32_params():
    x, t = batch((2, 8, 8, 3))
    model32 = UNet(**TINY)
    model16 = UNet(**TINY, dtype=jnp.bfloat16)
    params = random_params(model32, x, t)
    params16 = abstract_params(model16, x.shape)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    chex.assert_trees_all_equal_shapes(params, params16)
    out32 = model32.apply({"params": params}, x, t)
    out16 = jax.jit(lambda p: model16.apply({"params": p}, x, t))(params)
    assert out16.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out16)))
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel


# ----------------------------------------------------------------------------- labels


def test_unet_class_labels_and_null_class():
    num_classes = 3
    model = UNet(**TINY, num_classes=num_classes)
    x, t = batch((2, 8, 8, 3))
    params = random_params(model, x, t, jnp.array([0, 1]))
    assert params["label_emb"]["embedding"].shape == (num_classes + 1, 4 * 32)
    apply = jax.jit(lambda y: model.apply({"params": params}, x, t, y))
    out_a = apply(jnp.array([0, 1]))
    out_b = apply(jnp.array([2, 2]))
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3
    out_none = model.apply({"params": params}, x, t)
    out_null = model.apply({"params": params}, x, t, jnp.full((2,), num_classes))
    np.testing.assert_array_equal(out_none, out_null)


# ----------------------------------------------------------------------------- dropout


def test_unet_dropout_only_when_training():
    model = UNet(**{**TINY, "dropout": 0.3})
    x, t = batch((2, 8, 8, 3))
    params = random_params(model, x, t)
    apply = jax.jit(
        lambda seed, train: model.apply(
            {"params": params}, x, t, train=train, rngs={"dropout": jax.random.key(seed)}
        ),
        static_argnums=1,
    )
    np.testing.assert_array_equal(apply(1, False), apply(2, False))
    np.testing.assert_allclose(
        apply(1, False), model.apply({"params": params}, x, t), rtol=1e-5, atol=1e-5
    )
    assert float(jnp.max(jnp.abs(apply(1, True) - apply(2, True)))) > 1e-4
    np.testing.assert_array_equal(apply(1, True), apply(1, True))


# ----------------------------------------------------------------------------- ADM options


def test_unet_scale_shift_adds_one_projection_per_resblock():
    shape = (1, 8, 8, 3)
    plain = abstract_params(UNet(**TINY), shape)
    ss = abstract_params(UNet(**TINY, resblock_scale_shift=True), shape)
    emb_ch = 4 * TINY["ch"]
    resblocks = [k for k in plain if "_res_" in k]
    assert len(resblocks) == 2 * 1 + 2 * 2 + 2  # down, up (num_res_blocks + 1), middle
    extra = 0
    for name in resblocks:
        out_ch = plain[name]["temb_proj"]["kernel"].shape[1]
        assert ss[name]["temb_proj"]["kernel"].shape == (emb_ch, 2 * out_ch)
        extra += emb_ch * out_ch + out_ch
    assert count(ss) == count(plain) + extra

    model = UNet(**TINY, resblock_scale_shift=True)
    x, t = batch((2, 8, 8, 3))
    params = random_params(model, x, t)
    out = model.apply({"params": params}, x, t)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_unet_multi_head_attention():
    shape = (2, 8, 8, 3)
    one = UNet(**TINY)
    four = UNet(**TINY, num_heads=4)
    by_channels = UNet(**TINY, num_head_channels=16, num_heads=1)  # 64 channels -> 4 heads
    assert count(abstract_params(four, shape)) == count(abstract_params(one, shape))
    x, t = batch(shape)
    params = random_params(one, x, t)
    out_one = one.apply({"params": params}, x, t)
    out_four = four.apply({"params": params}, x, t)
    out_by_channels = by_channels.apply({"params": params}, x, t)
    assert float(jnp.max(jnp.abs(out_one - out_four))) > 1e-5
    np.testing.assert_allclose(out_four, out_by_channels, rtol=1e-6, atol=1e-6)


def test_unet_without_resampling_convs():
    shape = (1, 8, 8, 3)
    with_conv = count(abstract_params(UNet(**TINY), shape))
    without = count(abstract_params(UNet(**TINY, resamp_with_conv=False), shape))
    ch = TINY["ch"]
    # One downsample conv (32 ch) and one upsample conv (64 ch) fewer.
    assert with_conv - without == (9 * ch * ch + ch) + (9 * 4 * ch * ch + 2 * ch)


# ----------------------------------------------------------------------------- remat


def test_unet_remat_same_output_and_gradients():
    kwargs = {**ONE_LEVEL, "dropout": 0.2}
    model, remat_model = UNet(**kwargs), UNet(**kwargs, remat=True)
    x, t = batch((2, 8, 8, 3))
    params = random_params(model, x, t)
    rngs = {"dropout": jax.random.key(3)}

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, x, t, train=True, rngs=rngs) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss(model)))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat_model)))(params)
    np.testing.assert_allclose(value_r, value, rtol=1e-5)
    chex.assert_trees_all_close(grads_r, grads, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- forward mode


def check_forward_mode(apply, params, x, monkeypatch, seed=0, rtol=1e-4):
    """jax.jvp and jax.jacfwd through ``apply(params, x)`` give the directional derivatives of
    plain autodiff's reverse mode: for f(p, x) = sum(w * apply(p, x)) and random directions vp
    (every parameter) and vx, jacfwd of c -> f(p + c0 vp, x + c1 vx) at 0 is
    [<df/dp, vp>, <df/dx, vx>] and jvp along (vp, vx) is their sum. Reverse mode runs with the
    Dense layers' x^T route off (autodiff's own gradient), forward mode with it on in every
    Dense layer (the CPU route at any size), so the two share no hand-written derivative."""
    kw, kx, kp = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(kw, jax.eval_shape(apply, params, x).shape)
    vx = jax.random.normal(kx, x.shape)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(kp, len(leaves))
    vp_leaves = [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    vp = jax.tree.unflatten(treedef, vp_leaves)

    def f(p, x):
        return jnp.sum(w * apply(p, x))

    def along(c):
        return f(jax.tree.map(lambda p, v: p + c[0] * v, params, vp), x + c[1] * vx)

    monkeypatch.setattr(dense_lib, "MIN_ROWS", 10**9)
    gp, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
    monkeypatch.setattr(dense_lib, "MIN_ROWS", 1)
    gp_leaves = treedef.flatten_up_to(gp)
    reverse = np.array(
        [
            sum(float(jnp.vdot(g, v)) for g, v in zip(gp_leaves, vp_leaves, strict=True)),
            float(jnp.vdot(gx, vx)),
        ]
    )
    jacobian = jax.jit(jax.jacfwd(along))(jnp.zeros(2))
    _, tangent = jax.jit(lambda p, x: jax.jvp(f, (p, x), (vp, vx)))(params, x)
    scale = np.abs(reverse).max()
    assert scale > 1e-3, reverse  # directional derivatives that are not zero by construction
    np.testing.assert_allclose(np.asarray(jacobian), reverse, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(float(tangent), reverse.sum(), rtol=0, atol=rtol * scale)


def test_unet_forward_mode_equals_reverse_mode(monkeypatch):
    """jax.jvp / jax.jacfwd through the U-Net (ResBlocks, attention, resampling)."""
    model = UNet(**TINY, num_heads=2)
    x, t = batch((2, 8, 8, 3))
    params = random_params(model, x, t)
    check_forward_mode(lambda p, x: model.apply({"params": p}, x, t), params, x, monkeypatch)


# ----------------------------------------------------------------------------- attention


def numpy_group_norm(x, scale, bias, groups=32, eps=1e-6):
    """float64 GroupNorm over H, W and each group's channels, two-pass variance."""
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_attention_block_matches_float64_numpy():
    """AttnBlock (2 heads of d = 32) against a float64 numpy transcription: GroupNorm, q/k/v,
    softmax(q k^T / sqrt(d)) per head, the weighted sum of v, proj_out, residual."""
    block = AttnBlock(num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) / 4, shapes)
    out = jax.jit(lambda p, x: block.apply({"params": p}, x))(params, x)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = np.asarray(x, np.float64)
    h = numpy_group_norm(x64, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, 16, 64)

    def dense(name, v):
        return v @ p[name]["kernel"] + p[name]["bias"]

    q, k, v = (dense(n, h).reshape(2, 16, 2, 32) for n in ("q", "k", "v"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 16, 64)
    want = x64 + dense("proj_out", attended).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bfloat16 reaches the products


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (jit, checkpoint, custom_jvp, cond)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _sub_jaxprs(eqn):
            yield from all_eqns(sub)


def operand_dtypes(eqns, primitive):
    """(operand dtypes, precision) of every equation of ``primitive``, as strings."""
    return [
        (tuple(str(v.aval.dtype) for v in e.invars), str(e.params.get("precision")))
        for e in eqns
        if e.primitive.name == primitive
    ]


def test_unet_bfloat16_reaches_every_convolution_and_matmul():
    """UNet(dtype=bfloat16): in the jaxprs of the forward and of value_and_grad, every
    convolution and every matmul takes bfloat16 operands, and the forward's reductions (the
    GroupNorm statistics and the softmax's max and sum) are float32.

    One exception, by design: in the backward of each attention block the two products with the
    float32 logits' cotangent (d q = d logits @ k, d k = d logits^T @ q) take that float32
    cotangent and a bfloat16 operand, with the BF16_BF16_F32 algorithm that
    ``jax.nn.dot_product_attention`` asks for; that algorithm rounds both operands to bfloat16 and
    accumulates in float32, so these too are bfloat16 products.
    """
    model = UNet(**TINY, dtype=jnp.bfloat16)
    x, t = batch((2, 8, 8, 3))
    params = abstract_params(model, x.shape)
    attn_blocks = 4  # down_1_attn_0, mid_attn, up_1_attn_0, up_1_attn_1

    def loss(p, x):
        return jnp.mean(model.apply({"params": p}, x, t) ** 2)

    forward = list(
        all_eqns(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, t))(params, x).jaxpr)
    )
    train = list(all_eqns(jax.make_jaxpr(jax.value_and_grad(loss))(params, x).jaxpr))
    bf16 = ("bfloat16", "bfloat16")
    mixed = (("float32", "bfloat16"), "BF16_BF16_F32")
    for eqns, mixed_count in ((forward, 0), (train, 2 * attn_blocks)):
        convs = operand_dtypes(eqns, "conv_general_dilated")
        dots = operand_dtypes(eqns, "dot_general")
        assert len(convs) >= 20 and all(d == bf16 for d, _ in convs), convs
        assert len(dots) >= 30 and all(d == bf16 or (d, p) == mixed for d, p in dots), dots
        assert sum((d, p) == mixed for d, p in dots) == mixed_count
    reductions = operand_dtypes(forward, "reduce_sum") + operand_dtypes(forward, "reduce_max")
    assert all(d == ("float32",) for d, _ in reductions), reductions
    assert len(operand_dtypes(forward, "reduce_max")) == attn_blocks  # the softmaxes' max


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, shape, call_kwargs, match",
    [
        ({}, (8, 8, 3), {}, "4-D NHWC"),
        (
            dict(ch_mult=(1, 2, 2)),
            (2, 6, 8, 3),
            {},
            "divisible by 2\\*\\*\\(len\\(ch_mult\\) - 1\\) = 4",
        ),
        (dict(ch=48), (2, 8, 8, 3), {}, "multiple of 32"),
        (dict(attn_resolutions=(16,)), (2, 8, 8, 3), {}, "\\[16\\] never occur"),
        ({}, (2, 8, 8, 3), dict(t=jnp.zeros((3,), jnp.int32)), "t must have shape"),
        (
            dict(num_classes=3),
            (2, 8, 8, 3),
            dict(y=jnp.zeros((3,), jnp.int32)),
            "labels y must have shape",
        ),
        (dict(num_classes=3), (2, 8, 8, 3), dict(y=jnp.array([0, 4])), "must lie in \\[0, 3\\]"),
        (dict(num_classes=3), (2, 8, 8, 3), dict(y=jnp.array([0.0, 1.0])), "must be integers"),
        ({}, (2, 8, 8, 3), dict(y=jnp.zeros((2,), jnp.int32)), "model is unconditional"),
        (dict(num_heads=3), (2, 8, 8, 3), {}, "num_heads=3 must divide"),
        (dict(num_head_channels=24), (2, 8, 8, 3), {}, "num_head_channels=24 must divide"),
        (dict(dropout=1.0), (2, 8, 8, 3), {}, "dropout must be in"),
        (dict(ch_mult=()), (2, 8, 8, 3), {}, "ch_mult must be a non-empty"),
    ],
)
def test_unet_validation_errors(kwargs, shape, call_kwargs, match):
    model = UNet(**{**TINY, **kwargs})
    x = jnp.zeros(shape)
    t = call_kwargs.pop("t", jnp.zeros(shape[:1], jnp.int32))
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), x, t, **call_kwargs)


# ----------------------------------------------------------------------------- MLP


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(time_embedding="none"),
        dict(time_embedding="sinusoidal"),
        dict(time_embedding="sinusoidal", fourier_features=16),
        dict(time_embedding="learned", fourier_features=1),
    ],
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_mlp_shape_and_time_dependence(kwargs, learn_sigma):
    model = MLPDenoiser(hidden=32, num_layers=2, learn_sigma=learn_sigma, **kwargs)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    t0, t1 = jnp.zeros((5,), jnp.int32), jnp.full((5,), 500, jnp.int32)
    params = model.init(jax.random.key(1), x, t0)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    apply = jax.jit(lambda t: model.apply({"params": params}, x, t))
    out0, out1 = apply(t0), apply(t1)
    chex.assert_shape(out0, (5, 4 if learn_sigma else 2))
    assert out0.dtype == jnp.float32
    if kwargs["time_embedding"] == "none":
        np.testing.assert_array_equal(out0, out1)
    else:
        assert float(jnp.max(jnp.abs(out0 - out1))) > 1e-4


def test_mlp_fourier_features_set_the_input_width():
    x = jnp.zeros((3, 2))
    t = jnp.zeros((3,), jnp.int32)
    raw = MLPDenoiser(hidden=32, time_embedding="none").init(jax.random.key(0), x, t)["params"]
    ff = MLPDenoiser(hidden=32, time_embedding="none", fourier_features=8)
    ff_params = ff.init(jax.random.key(0), x, t)["params"]
    assert raw["dense_in"]["kernel"].shape == (2, 32)
    assert ff_params["dense_in"]["kernel"].shape == (2 * 2 * 8, 32)
    learned = MLPDenoiser(hidden=32, time_embedding="learned").init(jax.random.key(0), x, t)
    assert {"temb_dense0", "temb_dense1"} <= set(learned["params"])
    assert learned["params"]["dense_in"]["kernel"].shape == (2 + 32, 32)


def test_mlp_class_labels_and_null_class():
    model = MLPDenoiser(hidden=32, num_classes=4)
    x = jax.random.normal(jax.random.key(0), (3, 2))
    t = jnp.full((3,), 10, jnp.int32)
    params = model.init(jax.random.key(1), x, t)["params"]
    out_a = model.apply({"params": params}, x, t, jnp.array([0, 1, 2]))
    out_b = model.apply({"params": params}, x, t, jnp.array([3, 3, 3]))
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-4
    np.testing.assert_array_equal(
        model.apply({"params": params}, x, t),
        model.apply({"params": params}, x, t, jnp.full((3,), 4)),
    )


def test_mlp_bfloat16_and_errors():
    x = jax.random.normal(jax.random.key(0), (3, 2))
    t = jnp.arange(3)
    model16 = MLPDenoiser(hidden=32, dtype=jnp.bfloat16, fourier_features=4)
    variables = model16.init(jax.random.key(1), x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    out16 = model16.apply(variables, x, t)
    out32 = MLPDenoiser(hidden=32, fourier_features=4).apply(variables, x, t)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out32, atol=0.1)
    with pytest.raises(ValueError, match="time_embedding must be one of"):
        MLPDenoiser(time_embedding="fourier").init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="2-D batch of points"):
        MLPDenoiser().init(jax.random.key(0), x[:, :, None], t)
    with pytest.raises(ValueError, match="t must have shape"):
        MLPDenoiser().init(jax.random.key(0), x, jnp.arange(4))


def test_mlp_forward_mode_equals_reverse_mode(monkeypatch):
    model = MLPDenoiser(hidden=32, num_layers=2, time_embedding="learned", num_classes=3)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    t, y = jnp.arange(5) * 100, jnp.array([0, 1, 2, 3, 0])
    params = model.init(jax.random.key(1), x, t, y)["params"]
    check_forward_mode(lambda p, x: model.apply({"params": p}, x, t, y), params, x, monkeypatch)
