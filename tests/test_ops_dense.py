"""ops/dense.py: the same values as ``lax.dot_general``; tangents and gradients (the CPU x^T route
included) equal to float64 numpy and to autodiff's, forward mode included; reverse mode keeps x^T
and computes the kernel gradient as the row-major ``x^T @ g``."""

import contextlib
import io
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from diffusion_jax.models.unet import AttnBlock, ResBlock
from diffusion_jax.ops import dense as dense_lib

SHAPES = [((6, 5), 4), ((2, 3, 4, 7), 3), ((3, 8, 2), 9)]  # (x shape, Co)
ROUTES = pytest.mark.parametrize("min_rows", [1, 10**9], ids=["x_transposed", "autodiff"])


def _dims(x):
    return (((x.ndim - 1,), (0,)), ((), ()))


def _f(x, w):
    return dense_lib.dot_general(x, w, _dims(x))


def _case(case, dtype=np.float32):
    shape, co = SHAPES[case]
    rng = np.random.default_rng(case)
    x, dx = (rng.normal(size=shape).astype(dtype) for _ in range(2))
    w, dw = (rng.normal(size=(shape[-1], co)).astype(dtype) for _ in range(2))
    g = rng.normal(size=shape[:-1] + (co,)).astype(dtype)
    return x, w, dx, dw, g


@ROUTES
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_values_and_gradients_match_float64(case, min_rows, monkeypatch):
    monkeypatch.setattr(dense_lib, "MIN_ROWS", min_rows)
    x, w, _, _, g = _case(case)
    y = jax.jit(_f)(x, w)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    np.testing.assert_allclose(np.asarray(y), x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(lax.dot_general(x, w, _dims(x))))

    dx, dw = jax.jit(jax.vjp(_f, x, w)[1])(jnp.asarray(g))
    ci, co = w.shape
    dw_ref = x64.reshape(-1, ci).T @ g64.reshape(-1, co)  # sum over rows of x^T g
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())
    np.testing.assert_allclose(np.asarray(dx), g64 @ w64.T, rtol=1e-5, atol=1e-5)
    assert dx.shape == x.shape and dw.shape == w.shape


@ROUTES
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_forward_mode_matches_float64_and_autodiff(case, min_rows, monkeypatch):
    """jax.jvp: dy = dx @ W + x @ dW (float64 numpy), as autodiff's jvp of lax.dot_general; a
    tangent in x alone or in W alone (the other a symbolic zero) gives that term alone."""
    monkeypatch.setattr(dense_lib, "MIN_ROWS", min_rows)
    x, w, dx, dw, _ = _case(case)
    x64, w64, dx64, dw64 = (a.astype(np.float64) for a in (x, w, dx, dw))

    def plain(x, w):
        return lax.dot_general(x, w, _dims(x))

    _, tangent = jax.jit(lambda *a: jax.jvp(_f, a[:2], a[2:]))(x, w, dx, dw)
    np.testing.assert_allclose(np.asarray(tangent), dx64 @ w64 + x64 @ dw64, rtol=1e-5, atol=1e-5)
    ref = jax.jvp(plain, (x, w), (dx, dw))[1]
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(ref), rtol=1e-5, atol=1e-5)
    only_w = jax.jvp(lambda w: _f(x, w), (w,), (dw,))[1]
    np.testing.assert_allclose(np.asarray(only_w), x64 @ dw64, rtol=1e-5, atol=1e-5)
    only_x = jax.jvp(lambda x: _f(x, w), (x,), (dx,))[1]
    np.testing.assert_allclose(np.asarray(only_x), dx64 @ w64, rtol=1e-5, atol=1e-5)


@ROUTES
def test_float64_values_tangents_and_gradients_equal_autodiffs(min_rows, monkeypatch):
    """With x64 on, both routes agree with autodiff of lax.dot_general to float64 rounding."""
    monkeypatch.setattr(dense_lib, "MIN_ROWS", min_rows)
    with jax.enable_x64(True):
        x, w, dx, dw, g = (jnp.asarray(a) for a in _case(1, np.float64))
        assert x.dtype == jnp.float64

        def plain(x, w):
            return lax.dot_general(x, w, _dims(x))

        for ours, ref in [
            (_f(x, w), plain(x, w)),
            (jax.jvp(_f, (x, w), (dx, dw))[1], jax.jvp(plain, (x, w), (dx, dw))[1]),
            *zip(jax.vjp(_f, x, w)[1](g), jax.vjp(plain, x, w)[1](g), strict=True),
        ]:
            assert ours.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-13, atol=1e-13)


def _saved_residuals(f, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return out.getvalue()


def test_reverse_mode_saves_x_transposed_and_runs_x_transposed_at_g(monkeypatch):
    """x [4, 8, 6] (M = 32 rows), W [6, 5]. Reverse mode saves x^T [6, 32] (not x or a transposed
    copy in the backward pass), and the CPU program's kernel gradient is one row-major dot
    [6, 32] @ [32, 5] (contracting lhs axis 1 with rhs axis 0); with the route off, neither."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 6))
    w = jax.random.normal(jax.random.key(1), (6, 5))

    def loss(x, w):
        return jnp.sum(jnp.sin(_f(x, w)))

    def kernel_grad_dots(min_rows):
        monkeypatch.setattr(dense_lib, "MIN_ROWS", min_rows)
        hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()
        return re.findall(r"f32\[6,5\]\S* dot\(([^)]*)\), lhs_contracting_dims=\{(\d)\}", hlo), hlo

    monkeypatch.setattr(dense_lib, "MIN_ROWS", 1)
    saved = _saved_residuals(loss, x, w)
    assert re.search(r"f32\[6,32\] output of cond .*_kernel_tangent", saved), saved
    dots, hlo = kernel_grad_dots(1)
    assert len(dots) == 1 and dots[0][1] == "1", dots
    assert "f32[6,32]" in hlo and "f32[32,5]" in hlo
    monkeypatch.setattr(dense_lib, "MIN_ROWS", 10**9)
    assert "f32[6,32]" not in _saved_residuals(loss, x, w)
    dots, hlo = kernel_grad_dots(10**9)
    assert "f32[6,32]" not in hlo  # autodiff's: x contracted over its leading axes, no x^T


def _kernel_grad_lowered(monkeypatch, min_rows):
    monkeypatch.setattr(dense_lib, "MIN_ROWS", min_rows)
    x = jnp.ones((4, 8, 6))

    def loss(w):
        return dense_lib.dot_general(x, w, (((2,), (0,)), ((), ()))).sum()

    return jax.jit(jax.grad(loss)).lower(jnp.ones((6, 5))).as_text()


def test_cpu_kernel_gradient_takes_materialised_x_transpose(monkeypatch):
    """From MIN_ROWS rows the CPU program holds x^T behind an optimization barrier (so that XLA
    cannot fold it back into a transposed-operand dot); below it, autodiff's plain x^T @ g."""
    assert "optimization_barrier" in _kernel_grad_lowered(monkeypatch, 1)
    assert "optimization_barrier" not in _kernel_grad_lowered(monkeypatch, 10**9)


def test_program_lowered_for_tpu_and_gpu_has_autodiffs_kernel_gradient(monkeypatch):
    """``lax.platform_dependent``: lowered for TPU or CUDA (no device needed), the gradient program
    has no barrier, whatever MIN_ROWS; the CPU one has it."""
    monkeypatch.setattr(dense_lib, "MIN_ROWS", 1)
    x = jnp.ones((4, 8, 6))

    def loss(w):
        return jnp.sum(jnp.sin(dense_lib.dot_general(x, w, (((2,), (0,)), ((), ())))))

    traced = jax.jit(jax.grad(loss)).trace(jnp.ones((6, 5)))
    for platform in ("tpu", "cuda"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "optimization_barrier" not in text, platform
    assert "optimization_barrier" in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_bfloat16_stays_bfloat16_and_close_to_float32(monkeypatch):
    monkeypatch.setattr(dense_lib, "MIN_ROWS", 1)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    g = rng.normal(size=(64, 8)).astype(np.float32)
    ref = x.astype(np.float64).T @ g.astype(np.float64)
    dims = (((1,), (0,)), ((), ()))

    def dw(dtype):
        f = lambda w: dense_lib.dot_general(jnp.asarray(x, dtype), w, dims)  # noqa: E731
        out = jax.vjp(f, jnp.asarray(w, dtype))[1](jnp.asarray(g, dtype))[0]
        assert out.dtype == dtype
        return np.asarray(out, np.float32)

    assert np.abs(dw(jnp.bfloat16) - ref).max() / np.abs(ref).max() < 2e-2  # 8 mantissa bits
    assert np.abs(dw(jnp.float32) - ref).max() / np.abs(ref).max() < 1e-5


def test_other_contractions_fall_back_to_lax():
    """Not Dense's contraction (or a precision asked for): lax.dot_general, values and all."""
    a = jnp.arange(24.0).reshape(2, 3, 4)
    b = jnp.arange(8.0).reshape(2, 4)
    batch_dims = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(
        np.asarray(dense_lib.dot_general(a, b, batch_dims)),
        np.asarray(lax.dot_general(a, b, batch_dims)),
    )
    m = jnp.arange(12.0).reshape(3, 4)
    dims = (((1,), (1,)), ((), ()))  # m @ b^T
    np.testing.assert_array_equal(
        np.asarray(dense_lib.dot_general(m, b, dims)), np.asarray(lax.dot_general(m, b, dims))
    )
    high = dense_lib.dot_general(m, b.T, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(high), np.asarray(m @ b.T), rtol=1e-6)


def test_dense_module_same_params_and_outputs_as_flax():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    ours, flax_dense = dense_lib.Dense(4), nn.Dense(4)
    params = flax_dense.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params
    )
    np.testing.assert_array_equal(
        np.asarray(ours.apply(params, x)), np.asarray(flax_dense.apply(params, x))
    )
    assert ours.dot_general is dense_lib.dot_general


X_T_BARRIER = r"optimization_barrier %\S+ : tensor<\d+x\d+xf32>\n"


class _ResAttn(nn.Module):
    """A U-Net ResBlock that changes width (so it has a nin_shortcut), then self-attention."""

    @nn.compact
    def __call__(self, x, emb):
        return AttnBlock()(ResBlock(64)(x, emb))


def test_unet_blocks_gradients_unchanged_by_the_x_transposed_route(monkeypatch):
    """The U-Net's Dense layers (temb_proj, nin_shortcut, attention q/k/v/proj_out): parameter and
    input gradients through the x^T route equal autodiff's (the route off) to float32 rounding."""
    model = _ResAttn()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    emb = jax.random.normal(jax.random.key(3), (2, 16))
    params = model.init(jax.random.key(1), x, emb)["params"]
    leaves, treedef = jax.tree.flatten(params)  # zero-initialised layers would hide gradients
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(treedef, leaves)

    def grads():
        loss = lambda p, x: jnp.sum(model.apply({"params": p}, x, emb) ** 2)  # noqa: E731
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x)
        # x^T barriers hold one 2-D array (GroupNorm's jax.checkpoint adds barriers of several)
        x_transposed = re.findall(X_T_BARRIER, lowered.as_text())
        return lowered.compile()(params, x), len(x_transposed)

    monkeypatch.setattr(dense_lib, "MIN_ROWS", 1)
    ours, barriers = grads()
    monkeypatch.setattr(dense_lib, "MIN_ROWS", 10**9)
    ref, barriers_off = grads()
    assert barriers == 6 and barriers_off == 0  # temb_proj, nin_shortcut, q, k, v, proj_out
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref), strict=True
    ):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)


SHARDED = r"""
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from diffusion_jax.ops import dense as dense_lib
dense_lib.MIN_ROWS = 1
rng = np.random.default_rng(0)
x, dx = (rng.normal(size=(8, 4, 4, 8)).astype(np.float32) for _ in range(2))
w, dw = (rng.normal(size=(8, 6)).astype(np.float32) for _ in range(2))
g = rng.normal(size=(8, 4, 4, 6)).astype(np.float32)
x64, dx64, w64, dw64 = (a.astype(np.float64) for a in (x, dx, w, dw))
dw_ref = x64.reshape(-1, 8).T @ g.reshape(-1, 6).astype(np.float64)
tangent_ref = dx64 @ w64 + x64 @ dw64
def f(x, w):
    return dense_lib.dot_general(x, w, (((3,), (0,)), ((), ())))
for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    for w_spec in (P(), P("data")):  # a replicated kernel, and one sharded as FSDP shards it
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        args = put(x, P("data")), put(w, w_spec), put(g, P("data"))
        grads = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g))
        dx_, dw_ = grads(*args)
        np.testing.assert_allclose(np.asarray(dw_), dw_ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dx_), g @ w.T, rtol=1e-5, atol=1e-4)
        route = "optimization_barrier" in grads.lower(*args).as_text()
        assert route == (axis_type == AxisType.Auto), (axis_type, w_spec, route)
        tangents = put(dx, P("data")), put(dw, w_spec)
        _, t = jax.jit(lambda x, w, dx, dw: jax.jvp(f, (x, w), (dx, dw)))(*args[:2], *tangents)
        np.testing.assert_allclose(np.asarray(t), tangent_ref, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_sharded_batch_auto_and_explicit():
    """Batch sharded over 4 (fake CPU) devices, the kernel replicated or sharded: the same
    gradients and tangents; the x^T route under automatic sharding, autodiff's under explicit
    sharding (whose dots need an output sharding that autodiff's rule supplies)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
