"""DiT (Peebles & Xie 2023): the official parameter counts, adaLN-Zero's identity at init, patchify,
the forward against a float64 numpy transcription of ``facebookresearch/DiT``'s ``models.py``,
bfloat16 compute, a batch-sharded forward, and DiT as a denoiser through the trainer and sampler."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import ROOT
from test_models import all_eqns, operand_dtypes, random_params

import diffusion_jax as dj
from diffusion_jax import config_utils, sharding, trainer
from diffusion_jax.models import DIT_SIZES, DiT
from diffusion_jax.models.dit import DiTBlock, patchify, sincos_pos_embed, unpatchify

TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)
ONE_BLOCK = dict(TINY, depth=1)  # where a second block would only add compile time


def count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def inputs(shape=(2, 8, 8, 2), num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    t = (np.arange(shape[0]) * 397 % 1000).astype(np.int32)
    y = (np.arange(shape[0]) % (num_classes + 1)).astype(np.int32)  # the null class included
    return x, t, y


# ----------------------------------------------------------------------------- parameter counts


def official_count(hidden: int, depth: int, patch: int, size=32, channels=4, classes=1000) -> int:
    """``sum(p.numel() for p in model.parameters())`` of the official DiT (its train.py's figure) at
    ``learn_sigma=True`` and ``class_dropout_prob=0.1``, counted from its modules: PatchEmbed (a
    p x p conv with bias), the frozen sin-cos ``pos_embed`` (an nn.Parameter, so counted),
    TimestepEmbedder (Linear(256, D), Linear(D, D)), LabelEmbedder (1000 + 1 rows), per block qkv,
    proj, fc1 (4D), fc2, adaLN (6D), and FinalLayer (adaLN 2D, Linear(D, p^2 2C))."""
    d, tokens, out = hidden, (size // patch) ** 2, 2 * channels
    linear = lambda i, o: i * o + o  # noqa: E731
    block = linear(d, 3 * d) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d) + linear(d, 6 * d)
    final = linear(d, 2 * d) + linear(d, patch * patch * out)
    embed = patch * patch * channels * d + d + tokens * d
    cond = linear(256, d) + linear(d, d) + (classes + 1) * d
    return embed + cond + depth * block + final


def test_official_count_formula_gives_the_published_dit_xl_2_total():
    """675,129,632: what the official train.py prints for DiT-XL/2 (logged in the DiT, SiT and
    MindSpore ports' records); the formula above must give it before it checks S/2 and B/2."""
    assert official_count(1152, 28, 2) == 675_129_632


@pytest.mark.parametrize("size, total", [("S/2", 32_963_360), ("B/2", 130_512_416)])
def test_parameter_counts_match_the_official_dit(size, total):
    """At 32x32x4 latents (256x256 images), 1000 classes, learned sigma: a learned position table
    gives exactly the official total; the fixed sin-cos table (the paper's) is a constant here,
    so the count is the official total less its N x D frozen entries."""
    dims = DIT_SIZES[size]
    assert official_count(dims["hidden_size"], dims["depth"], dims["patch_size"]) == total
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = y = jax.ShapeDtypeStruct((1,), jnp.int32)
    for pos_embed, want in (("learned", total), ("sincos", total - 256 * dims["hidden_size"])):
        model = DiT(size=size, num_classes=1000, learn_sigma=True, pos_embed=pos_embed)
        params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
        assert count(params) == want, (size, pos_embed)


def test_sizes_are_the_papers_table_1():
    assert len(DIT_SIZES) == 12
    for name, (width, depth, heads) in {
        "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16),
    }.items():  # fmt: skip
        for p in (2, 4, 8):
            want = dict(hidden_size=width, depth=depth, num_heads=heads, patch_size=p)
            assert DIT_SIZES[f"{name}/{p}"] == want
    assert DiT(size="B/4", depth=3).dims() == dict(DIT_SIZES["B/4"], depth=3)  # a field overrides


# ----------------------------------------------------------------------------- adaLN-Zero at init


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_fresh_adaln_zero_block_is_exactly_the_identity(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    block = DiTBlock(num_heads=2, dtype=dtype)

    @jax.jit
    def fresh_and_perturbed(x, c):  # ... and only the zeros make it so: perturbed, x moves
        params = block.init(jax.random.key(1), x, c)
        perturbed = jax.tree.map(lambda a: a + 0.1, params)
        return block.apply(params, x, c), block.apply(perturbed, x, c)

    out, moved = fresh_and_perturbed(x, c)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    assert np.abs(np.asarray(moved) - np.asarray(x)).max() > 1e-2


def test_a_fresh_model_outputs_zeros_of_the_output_shape():
    """The final layer's zero init (section 3.2): a fresh DiT predicts exactly 0."""
    x, t, y = inputs()
    model = DiT(**ONE_BLOCK, num_classes=3, learn_sigma=True)
    params, out = jax.jit(
        lambda x: (v := model.init(jax.random.key(0), x, t, y), model.apply(v, x, t, y))
    )(x)
    params = params["params"]
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- patches, positions


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_matches_explicit_indexing_and_unpatchify_inverts_it(p):
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    tokens = np.asarray(patchify(jnp.asarray(x), p))
    h, w = 8 // p, 12 // p
    want = np.empty((2, h * w, p * p * 3), np.float32)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    want[:, i * w + j, (a * p + b) * 3 : (a * p + b + 1) * 3] = x[
                        :, i * p + a, j * p + b, :
                    ]
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(tokens), p, 8, 12)), x)


def test_patch_embedding_is_the_papers_stride_p_convolution():
    """The Dense over patchified tokens equals a p x p convolution with stride p (PatchEmbed)."""
    x, t, y = inputs((2, 8, 8, 2))
    model = DiT(**TINY, num_classes=3)
    params = random_params(model, x, t, y)
    kernel = params["x_embedder"]["kernel"]  # [p p C, D]
    conv = jax.lax.conv_general_dilated(
        jnp.asarray(x), kernel.reshape(2, 2, 2, 32), (2, 2), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
    )  # fmt: skip
    dense = patchify(jnp.asarray(x), 2) @ kernel
    np.testing.assert_allclose(np.asarray(dense), np.asarray(conv).reshape(2, 16, 32), atol=1e-5)


def official_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """``get_2d_sincos_pos_embed`` of facebookresearch/DiT (from MAE), transcribed."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)
    )
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_position_embedding_is_the_official_table():
    np.testing.assert_allclose(sincos_pos_embed(64, 4, 4), official_sincos(64, 4), atol=1e-6)
    np.testing.assert_allclose(sincos_pos_embed(32, 16, 16), official_sincos(32, 16), atol=1e-6)


# ----------------------------------------------------------------------------- the forward


def numpy_dit(params, x, t, y, patch, heads):
    """The official DiT forward in float64 numpy (NCHW turned NHWC), with the library's DDPM
    timestep sinusoid (see dit.py's docstring)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    lin = lambda name, v, q=p: v @ q[name]["kernel"] + q[name]["bias"]  # noqa: E731
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa: E731

    def norm(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    b, height, width, c = x.shape
    h, w = height // patch, width // patch
    d = p["x_embedder"]["kernel"].shape[1]
    kernel = p["x_embedder"]["kernel"].reshape(patch, patch, c, d)
    tokens = np.einsum("bipjqc,pqcd->bijd", x.reshape(b, h, patch, w, patch, c), kernel)
    tokens = tokens.reshape(b, h * w, d) + p["x_embedder"]["bias"] + official_sincos(d, h)
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    args = t.astype(np.float64)[:, None] * freqs
    cond = lin(
        "t_embedder_1", silu(lin("t_embedder_0", np.concatenate([np.sin(args), np.cos(args)], 1)))
    )
    cond = cond + p["y_embedder"]["embedding"][y]
    for i in range(len([k for k in p if k.startswith("blocks_")])):
        q = p[f"blocks_{i}"]
        mods = np.split(lin("adaLN_modulation", silu(cond), q), 6, axis=1)
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = mods
        a = modulate(norm(tokens), s_msa, sc_msa)
        qkv = (
            lin("qkv", a, q["attn"])
            .reshape(b, h * w, 3, heads, d // heads)
            .transpose(2, 0, 3, 1, 4)
        )
        logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (d // heads) ** -0.5
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        a = (attn @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, h * w, d)
        tokens = tokens + g_msa[:, None] * lin("proj", a, q["attn"])
        m = modulate(norm(tokens), s_mlp, sc_mlp)
        tokens = tokens + g_mlp[:, None] * lin("mlp_fc2", gelu(lin("mlp_fc1", m, q)), q)
    shift, scale = np.split(lin("final_adaLN_modulation", silu(cond)), 2, axis=1)
    out = lin("final_linear", modulate(norm(tokens), shift, scale))
    co = out.shape[-1] // (patch * patch)
    out = np.einsum("nhwpqc->nchpwq", out.reshape(b, h, w, patch, patch, co))
    return out.reshape(b, co, height, width).transpose(0, 2, 3, 1)


def test_forward_matches_the_official_model_in_float64_numpy():
    x, t, y = inputs()
    model = DiT(**TINY, num_classes=3, learn_sigma=True)
    params = random_params(model, x, t, y)
    out = jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params)
    want = numpy_dit(params, x.astype(np.float64), t, y, patch=2, heads=2)
    assert out.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bfloat16_reaches_every_matmul_with_float32_params_statistics_and_output():
    """dtype=bfloat16: every dot in the forward's jaxpr takes bfloat16 operands (7 per block: qkv,
    q k^T, weights v, proj, fc1, fc2, adaLN; 6 more: patch, two time layers, the one-hot class
    table, final adaLN and linear); the LayerNorm and softmax reductions are float32; the output is close to float32's."""
    x, t, y = inputs()
    model16 = DiT(**ONE_BLOCK, num_classes=3, remat=True, dtype=jnp.bfloat16)
    model32 = DiT(**ONE_BLOCK, num_classes=3)
    params = random_params(model32, x, t, y)
    fwd = lambda m: lambda p, x: m.apply({"params": p}, x, t, y)  # noqa: E731
    eqns = list(all_eqns(jax.make_jaxpr(fwd(model16))(params, x).jaxpr))
    dots = operand_dtypes(eqns, "dot_general")
    assert len(dots) == 7 + 6 and all(d == ("bfloat16", "bfloat16") for d, _ in dots), dots
    reductions = operand_dtypes(eqns, "reduce_sum") + operand_dtypes(eqns, "reduce_max")
    assert reductions and all(d == ("float32",) for d, _ in reductions), reductions
    out16, out32 = map(
        np.asarray, jax.jit(lambda p, x: (fwd(model16)(p, x), fwd(model32)(p, x)))(params, x)
    )
    assert out16.dtype == np.float32
    assert np.abs(out16 - out32).max() / np.abs(out32).max() < 5e-2  # 8 mantissa bits


def test_forward_mode_and_reverse_mode_agree_and_match_finite_differences():
    """jax.jvp through DiT: <u, J v> from jvp equals <J^T u, v> from vjp, and a central difference."""
    x, t, y = inputs()
    model = DiT(**ONE_BLOCK, num_classes=3, remat=True)
    params = random_params(model, x, t, y)
    f = lambda x: model.apply({"params": params}, x, t, y)  # noqa: E731
    rng = np.random.default_rng(1)
    v = rng.standard_normal(x.shape).astype(np.float32)
    u = rng.standard_normal((2, 8, 8, 2)).astype(np.float32)
    eps = 1e-2

    @jax.jit
    def derivatives(x, v, u):
        jv = jax.jvp(f, (x,), (v,))[1]
        (jtu,) = jax.vjp(f, x)[1](u)
        return jv, jtu, f(x + eps * v), f(x - eps * v)

    jv, jtu, plus, minus = derivatives(x, v, u)
    forward, reverse = (
        np.vdot(u, np.asarray(jv, np.float64)),
        np.vdot(np.asarray(jtu, np.float64), v),
    )
    assert abs(forward - reverse) <= 1e-4 * abs(reverse)
    fd = (np.asarray(plus, np.float64) - np.asarray(minus, np.float64)) / (2 * eps)
    assert np.abs(fd - np.asarray(jv)).max() <= 1e-2 * np.abs(fd).max()


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(size="M/2"), (1, 8, 8, 1), "not one of the DiT sizes"),
        (dict(hidden_size=32, depth=1), (1, 8, 8, 1), "needs \\['num_heads', 'patch_size'\\]"),
        (dict(TINY, num_heads=3), (1, 8, 8, 1), "num_heads=3 must divide hidden_size=32"),
        (dict(TINY, hidden_size=34, num_heads=2), (1, 8, 8, 1), "multiple of 4"),
        (dict(TINY, pos_embed="rope"), (1, 8, 8, 1), "pos_embed='rope' is not one of"),
        (TINY, (1, 7, 8, 1), "multiples of patch_size=2, got H=7"),
        (TINY, (8, 8, 1), "4-D NHWC"),
    ],
)
def test_errors_name_the_problem(kwargs, shape, match):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(DiT(**kwargs).init, jax.random.key(0), x, t)


# ----------------------------------------------------------------------------- sharding


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from diffusion_jax.models import DiT
model = DiT(hidden_size=32, depth=1, num_heads=2, patch_size=2, num_classes=3, learn_sigma=True)
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 8, 8, 2)).astype(np.float32)
t, y = np.arange(8, dtype=np.int32) * 120, np.arange(8, dtype=np.int32) % 4
shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
params = jax.tree.map(  # random, so that no output is zero by construction; no init to compile
    lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), shapes)
forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
ref = np.asarray(forward(params, x, t, y))
assert np.abs(ref).max() > 0.1
for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    split = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        p = jax.device_put(params, NamedSharding(mesh, P()))
        out = forward(p, *(jax.device_put(a, split) for a in (x, t, y)))
        assert out.sharding.spec[0] == "data", out.sharding
        assert len(out.sharding.device_set) == 4
        err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
        assert err < 1e-5, (axis_type, err)
print("ok")
"""


def test_batch_sharded_forward_over_4_devices_equals_the_unsharded_one():
    """On 4 fake CPU devices, automatic and explicit (``AxisType.Explicit``) sharding of the batch."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ----------------------------------------------------------------------------- through the library


def test_trains_through_the_trainer_and_samples_with_classifier_free_guidance():
    """configs/digits_dit.py, shrunk and switched to flow matching: the trainer's own programs
    (``trainer.build_programs``: the jitted, donated step with label dropout, clipping and EMA)
    run 5 steps that move every parameter (gradients reach past the zero-initialised gates and
    output layer), and ``build_sampler`` with the guidance wrapper samples from the result."""
    sys.path.insert(0, str(ROOT))
    from configs import digits_dit, digits_flow

    config = digits_flow.flow_matching(digits_dit.get_config(), num_steps=4)
    config.model.update(hidden_size=32, depth=1, num_heads=2)
    config.train.batch_size = 8
    config.optim.warmup_steps = 0
    config.sample.num_samples = 0
    cfg = config_utils.parse_config(config)
    data_shape = (8, 8, 1)
    programs = trainer.build_programs(cfg, sharding.make_mesh(), data_shape)
    state = jax.jit(
        lambda: trainer.init_state(programs.model, cfg, data_shape, programs.tx),
        out_shardings=programs.state_shardings,
    )()
    fresh = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = {
            "x": rng.uniform(-1, 1, (8, *data_shape)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        state, metrics = programs.train_step(state, batch, programs.process)
        assert bool(metrics["finite"]), metrics
    state = jax.device_get(state)
    assert int(state.step) == 5
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, fresh)
    assert all(jax.tree.leaves(moved)), moved
    model = programs.model

    # At scale 1 the guided chain is exactly the conditional one, evaluated beside the null-class
    # half as the wrapper batches it (batch 8 and batch 4 round differently): the null half does
    # not leak into the conditional one.
    denoise = config_utils.denoise_fn_for(model)
    guided = dj.classifier_free_guidance(denoise, null_label=10)

    def beside_null(p, x, t, y):
        both = denoise(p, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([y, jnp.full_like(y, 10)]))  # fmt: skip
        return both[: x.shape[0]]

    samplers = [config_utils.build_sampler(cfg, denoise_fn=f) for f in (guided, beside_null)]
    sample_cfg, sample_beside = (jax.jit(f, static_argnums=2) for f in samplers)
    key, y, shape = jax.random.key(1), jnp.arange(4, dtype=jnp.int32) * 3, (4, 8, 8, 1)
    at_1 = np.asarray(sample_cfg(state.params, key, shape, y=y, guidance_scale=1.0))
    at_4 = np.asarray(sample_cfg(state.params, key, shape, y=y, guidance_scale=4.0))
    np.testing.assert_array_equal(at_1, np.asarray(sample_beside(state.params, key, shape, y=y)))
    # Five steps teach the labels little, but guidance must move the samples by more than rounding.
    assert np.isfinite(at_4).all() and np.abs(at_4 - at_1).max() > 1e-5
